"""Static (CUDA-graph) decoding: ZipCache.to_static, StaticZipLayer, greedy_decode.

On the CPU the static path runs eagerly (same buffers, device-side counts, the decode
attention reference over them); the graphs themselves run on the GPU
(benchmarks/graph_check.py, results in experiments/NOTES.md).
"""

import pytest
import torch
from held_tensors import held_bytes
from tiny_models import padded_batch, tiny_model

import zipkv
from zipkv import cache_kwargs
from zipkv.cache.static_layer import StaticZipLayer
from zipkv.graph_decode import StaticDecoder, finish_at_eos, prompt_positions

CASES = [
    ("zipcache", dict(stream_interval=8, residual_length=4)),  # saliency from decode queries
    ("zipcache", dict(stream_interval=6, residual_length=3, sink_tokens=2)),
    ("kivi", dict(stream_interval=8, residual_length=4)),
    ("zipkv", dict(stream_interval=5)),  # 4-bit keys, 2-bit values
]


def _generate(model, method, kw, ids, mask, n):
    cache = zipkv.make_cache(method, model.config, decode_path="packed", **kw)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=n,
                             do_sample=False)
    return out[:, ids.shape[1]:], cache


@pytest.mark.parametrize("method,kw", CASES)
def test_static_decode_equals_generate_with_the_eager_cache(method, kw):
    """Same tokens as model.generate with the eager cache, left padding and EOS included,
    over enough steps for several blocks to be quantized between steps."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)
    expected, eager = _generate(model, method, kw, ids, mask, 22)
    cache = zipkv.make_cache(method, model.config, decode_path="packed", **kw)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=22, cuda_graph=False)
    assert torch.equal(tokens, expected)
    assert cache.is_static and cache.get_seq_length() == ids.shape[1] + tokens.shape[1] - 1
    layer = cache.layers[0]
    assert layer.lengths.tolist() == [t.num_tokens for t in layer.attended] + [layer.n_fp]
    # the same tokens in the same tiers as the eager cache, for rows generate() did not
    # finish (it feeds finished rows pad tokens, greedy_decode their own predictions)
    running = ~(expected == model.generation_config.eos_token_id).any(dim=1)
    assert running.any()
    for static_tier, eager_tier in zip((layer.low, layer.high), (eager.layers[0].low, eager.layers[0].high)):
        assert static_tier.num_tokens == eager_tier.num_tokens
        if eager_tier.num_tokens:
            k, v = static_tier.dequantize(torch.float32)
            k2, v2 = eager_tier.dequantize(torch.float32)
            assert torch.equal(k[running], k2[running]) and torch.equal(v[running], v2[running])


def test_qwen2_with_bias_and_no_padding():
    model = tiny_model("qwen2")
    ids, mask = padded_batch(length=30, pad=0, batch=3)
    expected, _ = _generate(model, "zipcache", dict(stream_interval=7), ids, mask, 15)
    cache = zipkv.make_cache("zipcache", model.config, decode_path="packed", stream_interval=7)
    assert torch.equal(zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=15, cuda_graph=False), expected)
    assert not cache.layers[0].padded


@pytest.mark.parametrize("method", ["zipcache", "kivi"])
def test_static_bytes_are_the_buffers_held(method):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)
    cache = zipkv.make_cache(method, model.config, decode_path="packed", stream_interval=8, residual_length=4)
    zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=12, cuda_graph=False)
    seen = set()
    assert cache.stats().bytes_held == sum(held_bytes(layer, seen) for layer in cache.layers)
    layer = cache.layers[0]
    # the capacity is what is held: the valid bytes are less
    valid = sum(sum(t.numel() * t.element_size() for t in (s.k_codes, s.v_codes))
                for s in (tier.valid_segment() for tier in layer.attended))
    assert sum(t.k_codes.numel() + t.v_codes.numel() for t in layer.attended) > valid


def test_static_buffers_do_not_move_and_counts_advance_on_the_device():
    """What a CUDA graph needs: the same tensors at the same addresses across steps and
    across quantization events; the counts change in place."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=20, pad=3)
    cache = zipkv.make_cache("kivi", model.config, stream_interval=4, residual_length=2, decode_path="packed")
    positions = prompt_positions(mask)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, 12, mask, cuda_graph=False)
    layer = cache.layers[0]
    names = ("k_win", "v_win", "lengths", "pad_mask")
    pointers = {n: getattr(layer, n).data_ptr() for n in names}
    tier_pointers = [t.k_codes.data_ptr() for t in layer.attended]
    counts = []
    for _ in range(10):
        decoder.step()
        counts.append(layer.lengths.tolist())
    assert {n: getattr(layer, n).data_ptr() for n in names} == pointers
    assert [t.k_codes.data_ptr() for t in layer.attended] == tier_pointers
    assert decoder.flushes >= 2  # blocks were quantized between steps
    assert [sum(c) for c in counts] == list(range(21, 31))
    # padding: the 3 pad tokens of row 1 sit at the front of the low tier, masked
    assert layer.pads_low.tolist() == [0, 3]
    assert layer.pad_mask[1, :3].tolist() == [False] * 3 and layer.pad_mask[0, :3].all()


def test_errors_are_clear():
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=20, pad=0)
    with pytest.raises(ValueError, match="holds the prompt"):  # full has a static form, once it holds a prompt
        zipkv.make_cache("full", model.config).to_static(4)
    cache = zipkv.make_cache("kivi", model.config)
    with pytest.raises(ValueError, match="holds the prompt"):
        cache.to_static(4)
    with pytest.raises(ValueError, match="extra_tokens"):
        cache.to_static(0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        zipkv.greedy_decode(model, cache, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        zipkv.greedy_decode(model, cache, ids[:, :0])
    with pytest.raises(ValueError, match="cuda_graph=True"):
        zipkv.greedy_decode(model, cache, ids, max_new_tokens=3, cuda_graph=True)
    cache = zipkv.make_cache("kivi", model.config)
    zipkv.greedy_decode(model, cache, ids, max_new_tokens=3, cuda_graph=False)
    with pytest.raises(ValueError, match="new, empty ZipCache"):
        zipkv.greedy_decode(model, cache, ids, max_new_tokens=3)
    with pytest.raises(NotImplementedError, match="keeps its batch rows"):
        cache.batch_select_indices(torch.tensor([0]))
    with pytest.raises(ValueError, match="one token per step"):
        cache.layers[0].update(torch.zeros(2, 2, 2, 16), torch.zeros(2, 2, 2, 16))


def test_nan_states_raise_at_the_next_quantization():
    """A step cannot stop the graph to check; the flag it sets raises between steps."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=20, pad=0)
    cache = zipkv.make_cache("kivi", model.config, stream_interval=4, residual_length=2)
    zipkv.greedy_decode(model, cache, ids, max_new_tokens=2, cuda_graph=False)
    layer = cache.layers[0]
    assert isinstance(layer, StaticZipLayer)
    bad = torch.full((2, 2, 1, 16), float("nan"))
    with torch.inference_mode():  # as StaticDecoder runs its steps
        layer.update(bad, bad)
        layer.awaiting_queries = False
        layer.advance()
        with pytest.raises(ValueError, match="NaN/inf"):
            layer.flush()


def test_finish_at_eos_pads_after_eos_and_cuts_when_all_rows_are_done():
    tokens = torch.tensor([[5, 2, 7, 8, 9], [5, 6, 7, 2, 9]])
    out = finish_at_eos(tokens, torch.tensor([2]), pad=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 2]]
    assert finish_at_eos(tokens, torch.tensor([3]), pad=0).tolist() == tokens.tolist()


def test_graph_kernel_check_names_the_reason():
    """A shape the Triton kernel refuses would only fail inside the capture; it is refused
    up front (the tiny model's head_dim 16 is below the kernel's 32)."""
    pytest.importorskip("triton")
    from zipkv.graph_decode import _check_graph_kernel

    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=20, pad=0)
    cache = zipkv.make_cache("kivi", model.config)
    zipkv.greedy_decode(model, cache, ids, max_new_tokens=2, cuda_graph=False)
    with pytest.raises(ValueError, match="cuda_graph decoding needs the Triton decode kernel.*head_dim 16"):
        _check_graph_kernel(model, cache)


def _decode_with(model, method, kw, ids, mask, steps, device_flush):
    cache = zipkv.make_cache(method, model.config, decode_path="packed", **kw)
    positions = prompt_positions(mask)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, steps, mask, cuda_graph=False,
                            device_flush=device_flush)
    tokens = torch.cat([decoder.step().clone() for _ in range(steps)], dim=1)
    return tokens, cache, decoder


@pytest.mark.parametrize("method,kw", CASES)
@pytest.mark.parametrize("pad", [0, 6])
def test_block_quantization_with_device_offsets_equals_the_host_one(method, kw, pad):
    """flush_on_device (what the CUDA graph of a block holds) stores exactly what flush()
    stores: same tokens out, same codes, parameters, window and counts."""
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=pad)
    host, host_cache, _ = _decode_with(model, method, kw, ids, mask, 24, device_flush=False)
    dev, dev_cache, decoder = _decode_with(model, method, kw, ids, mask, 24, device_flush=True)
    assert decoder.device_flushes >= 2
    assert torch.equal(host, dev)
    for a, b in zip(host_cache.layers, dev_cache.layers):
        assert a.lengths.tolist() == b.lengths.tolist() and a.n_fp == b.n_fp
        for ta, tb in zip(a.attended, b.attended):
            assert (ta.num_tokens, ta.num_groups, ta.num_chunks) == (tb.num_tokens, tb.num_groups, tb.num_chunks)
            assert [int(ta.device_groups), int(ta.device_chunks)] == [int(tb.device_groups), int(tb.device_chunks)]
            for x, y in zip(vars(ta.valid_segment()).values(), vars(tb.valid_segment()).values()):
                assert (x == y) if not isinstance(x, torch.Tensor) else torch.equal(x, y)
        n = a.n_fp
        assert torch.equal(a.k_win[:, :, :n], b.k_win[:, :, :n]) and torch.equal(a.v_win[:, :, :n], b.v_win[:, :, :n])
        assert torch.equal(a.score_win, b.score_win) and torch.equal(a.count_win, b.count_win)


@pytest.mark.parametrize("device_flush", [False, True])
def test_decoding_past_the_room_asked_for_is_a_clear_error(device_flush):
    """The buffers hold the steps asked for (plus up to a block); stepping on past them stops
    with the host path's error, never a write past the buffers' end."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=20, pad=0)
    cache = zipkv.make_cache("kivi", model.config, stream_interval=4, residual_length=2)
    positions = prompt_positions(mask)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, 4, mask, cuda_graph=False,
                            device_flush=device_flush)
    with pytest.raises(RuntimeError, match="static tier full"):
        for _ in range(40):
            decoder.step()
