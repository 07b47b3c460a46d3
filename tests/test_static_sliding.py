"""Sliding-window and chunked layers in static (CUDA-graph) form: StaticSlidingLayer, a ring
of reusable key-group slots whose mask is computed on the device from token positions.

On CPU the static path runs eagerly (cuda_graph=False): the same buffers and kernels a
captured graph replays."""

import pytest
import torch
from held_tensors import held_bytes
from tiny_models import padded_batch, tiny_model
from transformers.masking_utils import chunked_overlay, sliding_window_overlay

import zipkv
from zipkv import cache_kwargs
from zipkv.cache.static_sliding_layer import EMPTY, StaticSlidingLayer, ring_slots, window_visible
from zipkv.cache.static_window_layer import StaticWindowLayer
from zipkv.graph_decode import StaticDecoder, prompt_positions

QUANTIZING = ("zipkv", "zipcache", "kivi", "uniform")
SMALL = dict(stream_interval=8, residual_length=4)
# (name, tiny model settings): Gemma 3's [sliding, full] at window 8 (block 8, residual 0: one
# group in the ring at a time), all-sliding at windows 16 and 20 (residual 4; 20 is not a
# multiple of the block)
MODELS = {
    "gemma3": {},
    "all_sliding_16": dict(layer_types=["sliding_attention"] * 2, sliding_window=16),
    "all_sliding_20": dict(layer_types=["sliding_attention"] * 2, sliding_window=20),
}


def method_params(method: str) -> dict:
    spec = zipkv.METHODS[method]
    return {name: value for name, value in {**SMALL, "decode_path": "packed"}.items() if name in spec.params}


def eager_tokens(model, method, ids, mask, n):
    """What model.generate() gives with the eager cache (reading the packed ring, as the static form does)."""
    cache = zipkv.METHODS[method].build(model.config, **method_params(method))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=n,
                             do_sample=False, min_new_tokens=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", QUANTIZING)
def test_static_tokens_equal_eager_generate(name, method):
    model = tiny_model("gemma3", **MODELS[name])
    ids, mask = padded_batch(length=40, pad=6)
    expected = eager_tokens(model, method, ids, mask, 12)
    cache = zipkv.METHODS[method].build(model.config, **method_params(method))
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=12, cuda_graph=False)
    assert cache.is_static
    kinds = getattr(model.config, "layer_types")
    assert [isinstance(layer, StaticSlidingLayer) for layer in cache.layers] == [k == "sliding_attention" for k in kinds]
    assert torch.equal(tokens, expected), f"{method} on {name}: static and eager forms disagree"
    assert cache.stats().bytes_held == held_bytes(cache)


@pytest.mark.parametrize("method", ["zipkv", "kivi"])
def test_padding_inside_the_window(method):
    """A prompt shorter than the window: the padded row's padding sits in the ring and the
    fp16 window, where only the layer's own mask hides it."""
    model = tiny_model("gemma3", **MODELS["all_sliding_16"])
    ids, mask = padded_batch(length=14, pad=6)
    expected = eager_tokens(model, method, ids, mask, 20)
    cache = zipkv.METHODS[method].build(model.config, **method_params(method))
    assert torch.equal(zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=20, cuda_graph=False), expected)


def test_ring_reuses_its_slots_and_holds_the_same_bytes():
    """Over many windows' worth of tokens the ring writes more key groups than it has slots,
    and the bytes held never change (nothing grows with the tokens decoded)."""
    model = tiny_model("gemma3", **MODELS["all_sliding_16"])
    ids, mask = padded_batch(length=40, pad=6)
    cache = zipkv.make_cache("zipkv", model.config, **SMALL)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(mask), **cache_kwargs(cache),
                      use_cache=True).logits[:, -1:].argmax(-1)
    steps = 48
    decoder = StaticDecoder(model, cache, first, prompt_positions(mask)[:, -1] + 1, steps, mask, cuda_graph=False)
    layer = cache.layers[0]
    assert layer.ring.slots == ring_slots(16, layer.block, [8, 8]) == 3  # ceil(15 / 8) + 1 groups live at most
    before = cache.stats().bytes_held
    written = 0
    for _ in range(steps):
        flushes = decoder.flushes
        decoder.step()
        written += decoder.flushes - flushes
        assert cache.stats().bytes_held == before == held_bytes(cache)
    assert written > layer.ring.slots  # slots were reused
    assert layer.get_seq_length() == ids.shape[1] + steps
    # what the ring holds: whole groups of 8 positions, the newest right before the fp16 window
    newest = layer.get_seq_length() - 1
    held = layer.ring.positions[layer.ring.positions != EMPTY]
    assert held.numel() == layer.ring.num_tokens() and held.numel() % layer.block == 0
    assert int(held.max()) == newest - layer.n_fp


def test_chunked_attention_static_equals_eager():
    """Llama 4's chunked layers (chunk 16, counted from each row's first real token)."""
    model = tiny_model("llama4", head_dim=64)
    ids, mask = padded_batch(length=40, pad=6)
    for method in ("zipkv", "kivi"):
        expected = eager_tokens(model, method, ids, mask, 30)
        cache = zipkv.METHODS[method].build(model.config, **method_params(method))
        tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=30, cuda_graph=False)
        assert isinstance(cache.layers[0], StaticSlidingLayer) and cache.layers[0].kind == "chunked_attention"
        assert torch.equal(tokens, expected), method
        assert cache.stats().bytes_held == held_bytes(cache)


@pytest.mark.parametrize("kind", ["sliding_attention", "chunked_attention"])
def test_window_visible_is_transformers_mask(kind):
    """window_visible equals transformers' window / chunk overlay and padding mask, on every
    (query, key) pair of padded rows; EMPTY slots are never visible."""
    window, pads = 5, torch.tensor([0, 3, 7])
    positions = torch.arange(30)
    overlay = sliding_window_overlay(window) if kind == "sliding_attention" else chunked_overlay(window, pads)
    for q in range(10, 30):
        seen = window_visible(kind, window, positions[None, :], q, pads)
        for row in range(3):
            expected = torch.tensor([bool(overlay(row, 0, q, k)) and k >= pads[row] and k <= q for k in range(30)])
            assert torch.equal(seen[row] & (positions <= q), expected), (q, row)
        assert not window_visible(kind, window, torch.tensor([[EMPTY]]), q, pads).any()


def test_static_layer_refuses_a_multi_token_step():
    model = tiny_model("gemma3")
    ids, mask = padded_batch(length=40, pad=6)
    cache = zipkv.make_cache("kivi", model.config, **SMALL)
    zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=2, cuda_graph=False)
    states = torch.zeros(2, 2, 3, 16)
    with pytest.raises(ValueError, match="one token per step"):
        cache.layers[0].update(states, states)


@pytest.mark.parametrize("method", ["streaming_llm", "h2o", "snapkv"])
@pytest.mark.parametrize("length", [12, 40])
def test_evicting_caches_keep_window_layers_exact_in_static_form(method, length):
    """An evicting cache keeps transformers' window layer (exact); its static form is an fp16
    ring of `window` slots (StaticWindowLayer). At 12 tokens the padded row's padding and the
    ring's unwritten slots are inside the window: only the layer's own mask hides them."""
    model = tiny_model("gemma3", sliding_window=16)
    ids, mask = padded_batch(length=length, pad=6)
    spec = zipkv.METHODS[method]
    params = {"ratio": 0.8, **({"window": 4, "kernel_size": 3} if "window" in spec.params else {})}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(spec.build(model.config, **params)),
                             max_new_tokens=20, do_sample=False, min_new_tokens=0)
    cache = spec.build(model.config, **params)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=20, cuda_graph=False)
    assert cache.is_static and isinstance(cache.layers[0], StaticWindowLayer)
    assert torch.equal(tokens, out[:, length:]), method
    assert cache.stats().bytes_held == held_bytes(cache)


def stepped_logits(model, cache, ids, mask, steps, static):
    """Last-token logits [steps, B, V] of a prompt then `steps` greedy steps. static: the cache
    goes to static form after the prompt and each step does what StaticDecoder does (without a
    graph): positions given, then advance() and flush() where due."""
    positions = prompt_positions(mask)
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache), use_cache=True)
        token, position = out.logits[:, -1:].argmax(-1), positions[:, -1:] + 1
        if static:
            cache.to_static(steps, mask)
        for _ in range(steps):
            if static:
                out = model(input_ids=token, position_ids=position, **cache_kwargs(cache), use_cache=True,
                            cache_position=torch.tensor([cache.get_seq_length()]))
                for layer in cache.layers:
                    layer.advance()
                    if layer.flush_due():
                        layer.flush()
            else:
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=mask, position_ids=position, **cache_kwargs(cache),
                            use_cache=True)
            logits.append(out.logits[:, -1])
            token, position = out.logits[:, -1:].argmax(-1), position + 1
    return torch.stack(logits)


@pytest.mark.parametrize("method", ["kivi", "streaming_llm"])
def test_static_step_logits_equal_eager(method):
    """Closer than tokens: every step's logits, with padding and unwritten ring slots inside the window."""
    model = tiny_model("gemma3", sliding_window=16)
    ids, mask = padded_batch(length=12, pad=6)
    spec = zipkv.METHODS[method]
    params = {"ratio": 0.8} if spec.takes_budget else {**method_params(method)}
    eager = stepped_logits(model, spec.build(model.config, **params), ids, mask, 24, static=False)
    static = stepped_logits(model, spec.build(model.config, **params), ids, mask, 24, static=True)
    torch.testing.assert_close(static, eager, atol=1e-4, rtol=1e-4)
