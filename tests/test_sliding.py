"""Sliding-window and chunked-attention layers compressed as a packed ring (SlidingZipLayer)."""

import pytest
import torch
from transformers import DynamicCache

import zipkv
from zipkv import cache_kwargs
from zipkv.cache.sliding_layer import SlidingZipLayer, window_block
from zipkv.cache.tier import PackedTier
from zipkv.kernels.decode_attention import decode_attention
from held_tensors import held_bytes
from tiny_models import padded_batch, tiny_model

WINDOW = 32
FIVE_TO_ONE = ["sliding_attention"] * 5 + ["full_attention"]


def gemma3(window=WINDOW, layer_types=("sliding_attention", "full_attention"), **overrides):
    """Tiny Gemma 3 text model, head_dim 64 so quantization parameters do not dominate."""
    return tiny_model("gemma3", head_dim=64, sliding_window=window, layer_types=list(layer_types),
                      num_hidden_layers=len(layer_types), **overrides)


def prompt(length, seed=0, batch=1):
    return torch.randint(3, 250, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, cache, ids, mask=None, n=4):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def sliding_layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, SlidingZipLayer)]


def test_zipkv_preset_holds_4x_less_than_the_window_aware_dynamic_cache():
    window = 128
    model = gemma3(window, FIVE_TO_ONE, max_position_embeddings=1024).to(torch.bfloat16)
    ids = prompt(4 * window)
    reference = DynamicCache(config=model.config)
    generate(model, reference, ids, n=3)
    reference_bytes = sum(t.numel() * t.element_size() for layer in reference.layers for t in (layer.keys, layer.values))
    assert reference.layers[0].keys.shape[2] == window - 1  # transformers' layer keeps its window, in bf16
    cache = zipkv.make_cache("zipkv", model.config)
    generate(model, cache, ids, n=3)
    assert len(sliding_layers(cache)) == 5
    assert reference_bytes / cache.stats().bytes_held >= 4.0


@pytest.mark.parametrize("method", ["zipkv", "zipcache", "kivi"])
def test_stats_count_every_tensor_a_window_layer_holds(method):
    model = gemma3()
    ids, mask = padded_batch(length=4 * WINDOW, pad=5)
    cache = zipkv.make_cache(method, model.config)
    generate(model, cache, ids, mask, n=6)
    stats = cache.stats()
    layer = cache.layers[0]
    assert isinstance(layer, SlidingZipLayer)
    assert held_bytes(layer) == stats.bytes_per_layer[0] > 0
    assert held_bytes(cache.layers[1]) == stats.bytes_per_layer[1]
    # it holds about a window, not the 4 windows seen
    assert WINDOW - 1 <= stats.tokens_per_layer[0] < WINDOW + 2 * window_block(WINDOW, cache.settings)
    assert layer.get_seq_length() == ids.shape[1] + 5  # the logical length, for positions


def reference_attention(query, keys, values, scaling, q_pos, k_pos, allowed_pos):
    """Plain softmax attention in float32 over held keys, with the window mask built here."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scaling
    allowed = allowed_pos(q_pos[:, None], k_pos[None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ values.float()).transpose(1, 2)


def record_attention(layer, allowed_pos, records):
    """Wrap layer.attend: compare each output with the reference over what the layer holds."""
    attend = layer.attend

    def checked(module, query, key, value, attention_mask, scaling, **kwargs):
        tier = layer.tier
        parts = [tier.dequantize(torch.float32)] if tier.num_tokens else []
        keys = torch.cat([p[0] for p in parts] + [layer.fp16_keys.float()], dim=2)
        values = torch.cat([p[1] for p in parts] + [layer.fp16_values.float()], dim=2)
        if layer.inner.low.num_tokens + layer.inner.high.num_tokens == 0:  # first forward: the exact states
            keys, values = key.float(), value.float()
        offset = layer.offset
        k_pos = torch.arange(keys.shape[2]) + offset
        q_pos = torch.arange(query.shape[2]) + layer.get_seq_length() - query.shape[2]
        output = attend(module, query, key, value, attention_mask, scaling, **kwargs)
        expected = reference_attention(query, keys, values, scaling, q_pos, k_pos, allowed_pos)
        unmasked = reference_attention(query, keys, values, scaling, q_pos, k_pos, lambda q, k: k <= q)
        records.append(dict(error=(output[0].float() - expected).abs().max().item(),
                            without_mask=(unmasked - expected).abs().max().item(),
                            held=keys.shape[2], offset=offset, q_len=query.shape[2]))
        return output

    layer.attend = checked


@pytest.mark.parametrize("decode_path", ["dequantize", "packed"])
def test_window_attention_matches_a_reference_across_group_drops(decode_path):
    model = gemma3()
    cache = zipkv.make_cache("zipkv", model.config, decode_path=decode_path)
    layer = cache.layers[0]
    records = []
    record_attention(layer, lambda q, k: (k <= q) & (k > q - WINDOW), records)
    generate(model, cache, prompt(4 * WINDOW), n=24)
    assert [r["q_len"] for r in records] == [4 * WINDOW] + [1] * 23
    assert max(r["error"] for r in records) < 1e-4
    # the layer held tokens that had left the window, so the mask had work to do there ...
    assert any(r["held"] > WINDOW and r["without_mask"] > 1e-2 for r in records[1:])
    # ... and dropped whole groups as they expired: its oldest position jumped by a block
    offsets = [r["offset"] for r in records[1:]]
    assert any(b - a == window_block(WINDOW, cache.settings) for a, b in zip(offsets, offsets[1:]))
    assert max(r["held"] for r in records[1:]) < WINDOW + 2 * window_block(WINDOW, cache.settings)


@pytest.mark.parametrize("decode_path", ["dequantize", "packed"])
def test_several_tokens_on_top_of_a_window_cache(decode_path):
    """Forwards of several tokens after a cached context (a question, prefill chunks) see the
    window of each of their queries: positions and offsets line up across forwards."""
    model = gemma3()
    cache = zipkv.make_cache("zipkv", model.config, decode_path=decode_path)
    records = []
    record_attention(cache.layers[0], lambda q, k: (k <= q) & (k > q - WINDOW), records)
    ids = prompt(4 * WINDOW + 60)
    with torch.no_grad():
        for a, b in [(0, 4 * WINDOW), (4 * WINDOW, 4 * WINDOW + 40), (4 * WINDOW + 40, 4 * WINDOW + 45)]:
            model(input_ids=ids[:, a:b], **cache_kwargs(cache))
    assert [r["q_len"] for r in records] == [4 * WINDOW, 40, 5]
    assert max(r["error"] for r in records) < 1e-4
    assert all(r["without_mask"] > 1e-2 for r in records)
    assert cache.layers[0].offset > 4 * WINDOW + 45 - WINDOW - 2 * window_block(WINDOW, cache.settings)


def test_decode_kernel_reads_a_ring_whose_front_groups_were_dropped():
    """The Triton decode kernel (under the interpreter) over the ring tier after drops: its
    group / chunk boundaries restart at 0 and a value chunk is cut at the front."""
    model = gemma3()
    cache = zipkv.make_cache("zipkv", model.config)
    generate(model, cache, prompt(4 * WINDOW), n=20)
    layer = cache.layers[0]
    assert layer.offset > 3 * WINDOW and layer.tier.group_ends.numel() > 1  # groups were dropped, some remain
    query = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(0))
    parts = (query, [layer.tier], layer.fp16_keys, layer.fp16_values)
    kernel, reference = decode_attention(*parts, impl="triton"), decode_attention(*parts, impl="reference")
    assert torch.allclose(kernel.float(), reference.float(), atol=1e-3)


def test_chunked_attention_layer_matches_a_reference():
    model = tiny_model("llama4", head_dim=64)
    chunk = model.config.attention_chunk_size
    cache = zipkv.make_cache("zipkv", model.config)
    layer = cache.layers[0]
    assert isinstance(layer, SlidingZipLayer) and layer.kind == "chunked_attention"
    records = []
    record_attention(layer, lambda q, k: (k <= q) & (k // chunk == q // chunk), records)
    generate(model, cache, prompt(5 * chunk + 3), n=20)
    assert max(r["error"] for r in records) < 1e-4
    assert any(r["without_mask"] > 1e-2 for r in records[1:])
    assert layer.held_tokens() < chunk + 2 * window_block(chunk, cache.settings)


@pytest.mark.parametrize("arch, overrides", [
    ("gemma3", dict(layer_types=("sliding_attention", "full_attention"))),
    ("gemma3", dict(layer_types=FIVE_TO_ONE)),
    ("llama4", {}),
])
def test_full_still_equals_dynamic_cache(arch, overrides):
    model = gemma3(**overrides) if arch == "gemma3" else tiny_model(arch)
    ids, mask = padded_batch(length=4 * WINDOW, pad=7)
    expected = generate(model, DynamicCache(config=model.config), ids, mask, n=12)
    cache = zipkv.make_cache("full", model.config)
    assert not sliding_layers(cache)  # transformers' exact window layers
    assert torch.equal(generate(model, cache, ids, mask, n=12), expected)


@pytest.mark.parametrize("method", ["zipkv", "zipcache"])
@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_all_sliding_models_generate_compressed(arch, method):
    if arch == "mistral":
        model = tiny_model("mistral", sliding_window=16)
    else:
        model = gemma3(16, ["sliding_attention"] * 2)
    cache = zipkv.make_cache(method, model.config)
    assert len(sliding_layers(cache)) == 2
    out = generate(model, cache, prompt(64), n=10)
    assert out.shape == (1, 74)
    assert cache.stats().ratio > 1.0
    assert cache.get_seq_length() == 73


def test_padded_row_equals_the_row_alone():
    model = gemma3()
    pad = 7
    ids, mask = padded_batch(length=4 * WINDOW, pad=pad)
    both = generate(model, zipkv.make_cache("zipkv", model.config), ids, mask, n=24)
    alone = generate(model, zipkv.make_cache("zipkv", model.config), ids[1:, pad:], mask[1:, pad:], n=24)
    assert torch.equal(both[1, ids.shape[1]:], alone[0, ids.shape[1] - pad:])


def test_window_settings():
    settings = zipkv.CompressionConfig(high_bits=4, low_bits=2, residual_length=128, stream_interval=100)
    layer = SlidingZipLayer(settings, 0, 64)
    s = layer.settings
    assert (s.high_bits, s.low_bits, s.saliency, s.sink_tokens) == (2, 2, "none", 0)  # one tier, the low bits
    assert layer.block == s.key_group_size == s.stream_interval == 16
    assert s.residual_length == 64 - 16  # the fp16 part stays inside the window
    assert window_block(4096, settings) == 100  # never beyond stream_interval
    with pytest.raises(ValueError, match="config.attention_chunk_size"):
        SlidingZipLayer(settings, 0, None, "chunked_attention")
    with pytest.raises(ValueError, match="kind"):
        SlidingZipLayer(settings, 0, 64, "local")


def test_unknown_layer_type_is_refused_by_name():
    model = gemma3()
    model.config.layer_types = ["sliding_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        zipkv.make_cache("zipkv", model.config)


def test_tier_drops_its_oldest_groups():
    torch.manual_seed(0)
    tier = PackedTier(4, 8, None, True, 2, front_partial_group=True)
    keys, values = torch.randn(2, 3, 21, 16), torch.randn(2, 3, 21, 16)
    tier.append(keys[:, :, :13], values[:, :, :13])  # groups of 5 (the partial one first) and 8
    tier.append(keys[:, :, 13:], values[:, :, 13:])  # one group of 8
    assert tier.group_ends.tolist() == [5, 13, 21]
    k_all, v_all = tier.dequantize(torch.float32)
    assert tier.drop_front_groups(1) == 5
    assert tier.group_ends.tolist() == [8, 16] and tier.chunk_ends.tolist() == [8, 16]
    k, v = tier.dequantize(torch.float32)
    assert torch.equal(k, k_all[:, :, 5:]) and torch.equal(v, v_all[:, :, 5:])  # nothing re-quantized
    assert tier.drop_front_groups(1) == 8
    assert tier.chunk_ends.tolist() == [8] and tier.v_channel.shape[2] == 1  # a chunk wholly dropped goes
    # no view keeps the old buffers alive
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tier.tensors())
    assert tier.drop_front_groups(1) == 8 and tier.num_tokens == 0
    with pytest.raises(ValueError, match="n must be"):
        tier.drop_front_groups(1)


def test_eviction_and_minicache_on_all_sliding_models():
    model = tiny_model("mistral", sliding_window=16)
    cache = zipkv.make_cache("minicache", model.config)
    assert generate(model, cache, prompt(40), n=4).shape == (1, 44)
    with pytest.raises(ValueError, match="sliding"):
        zipkv.make_cache("snapkv", model.config, budget=16)
