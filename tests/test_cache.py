"""The compressed cache on tiny random models: exactness, padding, streaming, accounting."""

import pytest
import torch
from transformers import DynamicCache

import zipkv
from zipkv import cache_kwargs
from zipkv.cache.layer import ZipCacheLayer
from tiny_models import ARCHS, tiny_model, padded_batch
from held_tensors import held_bytes, reachable_tensors



def _padded_batch(length=48, pad=9, seed=1, batch=2):
    return padded_batch(length=length, pad=pad, seed=seed, batch=batch)


def _generate(model, cache, ids, mask, n=12):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=n, do_sample=False, pad_token_id=0
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    ids, mask = _padded_batch()
    expected = _generate(model, DynamicCache(config=model.config), ids, mask)
    cache = zipkv.make_cache("full", model.config)
    assert torch.equal(_generate(model, cache, ids, mask), expected)
    assert cache.stats().tokens_per_layer[-1] == ids.shape[1] + 11


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_generation_runs_and_compresses(arch):
    model = tiny_model(arch)
    ids, mask = _padded_batch(length=64)
    cache = zipkv.make_cache("zipcache", model.config, stream_interval=8)
    out = _generate(model, cache, ids, mask, n=20)
    assert out.shape == (2, 84)
    stats = cache.stats()
    assert stats.ratio > 1.5
    assert max(stats.tokens_per_layer) == 83


def test_several_tokens_on_top_of_a_cache_use_the_right_mask():
    """The notes' trap: a multi-token forward after a cached context must be causal-aligned."""
    model = tiny_model("llama")
    zipkv.enable_zipkv_attention(model)
    ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :50], **cache_kwargs(cache))
        tail = model(input_ids=ids[:, 50:], **cache_kwargs(cache)).logits
    assert torch.allclose(tail, whole[:, 50:], atol=1e-4)


def test_padded_row_matches_its_unpadded_run():
    model = tiny_model("llama")
    ids, mask = _padded_batch(length=40, pad=7)
    both = _generate(model, zipkv.make_cache("uniform", model.config, bits=4), ids, mask, n=10)
    alone = _generate(
        model, zipkv.make_cache("uniform", model.config, bits=4), ids[1:, 7:], mask[1:, 7:], n=10
    )
    assert torch.equal(both[1, 40:], alone[0, 33:])



@pytest.mark.parametrize("method", ["zipcache", "zipkv", "kivi", "uniform", "full"])
def test_stats_count_every_tensor_held(method):
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = _padded_batch(length=150)
    cache = zipkv.make_cache(method, model.config)
    _generate(model, cache, ids, mask, n=5)
    layer = cache.layers[0]
    reachable = reachable_tensors(layer)
    assert sum(t.numel() * t.element_size() for t in reachable) == cache.stats().bytes_held
    tokens = 154
    assert cache.stats().fp16_bytes == 2 * tokens * 2 * 2 * 16 * 2  # K+V, batch 2, 2 heads, dim 16, 2 bytes


def test_salient_tokens_land_in_high_tier():
    settings = zipkv.CompressionConfig(high_bits=8, low_bits=2, salient_ratio=0.25, probe_recent=1.0, probe_random=0.0)
    layer = ZipCacheLayer(settings, 0)
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 16, 8) * 0.1
    values = torch.randn(1, 1, 16, 8)
    hot = [2, 5, 11, 13]
    query = torch.zeros(1, 1, 16, 8)
    query[..., 0] = 10.0
    keys[:, :, hot, 0] = 3.0  # every query attends to these
    layer.update(keys, values)
    layer.observe(query, None, 1.0)
    assert layer.high.num_tokens == 4 and layer.low.num_tokens == 12
    high_keys, high_values = layer.high.dequantize(torch.float32)
    assert torch.allclose(high_values, values[:, :, hot], atol=0.05)


def test_streaming_quantizes_blocks_without_requantizing():
    model = tiny_model("llama", num_hidden_layers=1)
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(5))
    cache = zipkv.make_cache("zipcache", model.config, stream_interval=10, residual_length=4, sink_tokens=2)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
        layer = cache.layers[0]
        first_codes = layer.low.k_codes.clone()
        assert layer.keys.shape[2] == 6  # 2 sinks + 4 recent in fp16
        token = ids[:, -1:]
        for step in range(25):
            token = model(input_ids=token, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
            assert layer.keys.shape[2] <= 2 + 4 + 10
    assert layer.low.num_tokens + layer.high.num_tokens == 24 + 20
    assert torch.equal(layer.low.k_codes[:, :, : first_codes.shape[2]], first_codes)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(high_bits=3), "high_bits"),
        (dict(low_bits=16, high_bits=4), "low_bits"),
        (dict(salient_ratio=1.5), "salient_ratio"),
        (dict(probe_recent=-0.1), "probe_recent"),
        (dict(stream_interval=0), "stream_interval"),
        (dict(key_group_size=0), "key_group_size"),
    ],
)
def test_invalid_settings_raise(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        zipkv.ZipCache(model.config, **kwargs)


def test_unknown_method_and_sliding_only_model_raise():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="method"):
        zipkv.make_cache("nope", model.config)
    sliding = tiny_model("mistral", sliding_window=16)  # quantizing methods compress it (test_sliding.py)
    with pytest.raises(ValueError, match="sliding"):
        zipkv.make_cache("snapkv", sliding.config, budget=8)


def test_empty_update_raises():
    layer = ZipCacheLayer(zipkv.CompressionConfig(), 0)
    with pytest.raises(ValueError, match="no tokens"):
        layer.update(torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8))


def test_nan_states_raise():
    layer = ZipCacheLayer(zipkv.CompressionConfig(saliency="none"), 0)
    keys = torch.randn(1, 1, 8, 8)
    keys[0, 0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        layer.update(keys, torch.randn(1, 1, 8, 8))


def test_missing_zipkv_attention_is_a_clear_error():
    model = tiny_model("llama")
    cache = zipkv.make_cache("zipcache", model.config)
    model.config._attn_implementation = "sdpa"  # someone switched it back
    ids = torch.randint(3, 250, (1, 20))
    with torch.no_grad(), pytest.raises(RuntimeError, match="zipkv attention"):
        model(input_ids=ids, **cache_kwargs(cache))


def _greedy_steps(model, cache, ids, mask, steps):
    """Prefill, then `steps` greedy decode steps: (logits of each step, the chosen tokens)."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        logits, token, step_mask = [], out.logits[:, -1:].argmax(-1), mask
        chosen = [token]
        for _ in range(steps):
            step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
            out = model(input_ids=token, attention_mask=step_mask, **cache_kwargs(cache))
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            chosen.append(token)
    return torch.stack(logits), torch.cat(chosen, dim=1)


@pytest.mark.parametrize("method", ["zipcache", "kivi", "zipkv"])
def test_packed_decode_path_matches_dequantized_path(method):
    """The packed path (decode_attention over the codes; its PyTorch reference on CPU) must
    give the same logits as SDPA over a dequantized copy, step after step, padding included
    (zipkv: 4-bit keys, 2-bit values in one tier)."""
    model = tiny_model("llama")
    ids, mask = _padded_batch(length=40, pad=6)
    logits, tokens = {}, {}
    for path in ("packed", "dequantize"):
        cache = zipkv.make_cache(method, model.config, decode_path=path, stream_interval=8, residual_length=4)
        logits[path], tokens[path] = _greedy_steps(model, cache, ids, mask, 12)
        if path == "packed":
            assert cache.layers[0].returned_fp16_only  # the packed path really ran
            if method == "zipkv":
                tier = cache.layers[0].low
                assert (tier.bits, tier.value_bits) == (4, 2) and tier.num_tokens
    assert torch.equal(tokens["packed"], tokens["dequantize"])
    assert torch.allclose(logits["packed"], logits["dequantize"], atol=1e-4, rtol=1e-4)


def test_values_can_use_fewer_bits_than_keys():
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = _padded_batch(length=64)
    cache = zipkv.make_cache("zipcache", model.config, high_bits=4, low_bits=4, high_value_bits=2, low_value_bits=2)
    _generate(model, cache, ids, mask, n=4)
    layer = cache.layers[0]
    tier = layer.low if layer.low.num_tokens else layer.high
    assert tier.k_codes.shape[-1] == 16 * 4 // 8 and tier.v_codes.shape[-1] == 16 * 2 // 8
    assert not cache.settings.needs_queries  # one tier format for every token: nothing to score
    assert held_bytes(layer) == cache.stats().bytes_held
    with pytest.raises(ValueError, match="value_bits"):
        zipkv.make_cache("zipcache", model.config, low_value_bits=3)


def test_zipkv_preset_decodes_through_the_triton_kernel(monkeypatch):
    """The zipkv preset's tiers (4-bit keys, 2-bit values) read by the Triton kernel itself
    (CPU interpreter; head_dim 64 so the kernel takes the shapes): the same greedy tokens and
    close logits as SDPA over a dequantized copy."""
    from triton_mode import use_interpreter_or_skip

    use_interpreter_or_skip()  # not in a compiled GPU session: it would turn later launches interpreted
    import zipkv.cache.layer as layer_module
    from zipkv.kernels.decode_attention import decode_attention

    calls = []

    def triton_decode(*args, **kwargs):
        calls.append(1)
        return decode_attention(*args, impl="triton", block_n=32, block_n_fp=16, **kwargs)

    model = tiny_model("llama", num_hidden_layers=1, head_dim=64)
    ids, mask = _padded_batch(length=40, pad=6)
    settings = dict(stream_interval=8, residual_length=4)
    with monkeypatch.context() as patch:
        patch.setattr(layer_module, "decode_attention", triton_decode)
        cache = zipkv.make_cache("zipkv", model.config, decode_path="packed", **settings)
        packed_logits, packed_tokens = _greedy_steps(model, cache, ids, mask, 6)
    tier = cache.layers[0].low
    assert (tier.bits, tier.value_bits) == (4, 2) and tier.num_tokens
    assert len(calls) == 6  # one layer: every decode step went through the kernel
    cache = zipkv.make_cache("zipkv", model.config, decode_path="dequantize", **settings)
    logits, tokens = _greedy_steps(model, cache, ids, mask, 6)
    assert torch.equal(packed_tokens, tokens)
    assert torch.allclose(packed_logits, logits, atol=1e-3, rtol=1e-3)
