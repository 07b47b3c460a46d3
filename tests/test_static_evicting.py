"""Static (CUDA-graph) decoding of evicting caches: EvictionCache.to_static, StaticEvictingLayer.

On the CPU the static path runs eagerly (same buffers, device-side counts and slot indices, the
decode attention reference over them); the captured graphs run on the GPU (the last test).
"""

import pytest
import torch
from held_tensors import held_bytes
from tiny_models import generate_new_tokens, padded_batch, tiny_model

import zipkv
from zipkv import cache_kwargs
from zipkv.cache.static_evicting_layer import StaticEvictingLayer
from zipkv.eviction_cache import make_eviction_cache
from zipkv.graph_decode import StaticDecoder, StaticLayer, prompt_positions

SUPPORTED = ["snapkv", "pyramidkv", "cake", "defensive_kv", "key_norm", "streaming_llm", "h2o"]
# what still has no static form: a tiered cache whose two tiers are both 16-bit
UNSUPPORTED = {"three_tier": "both tiers are 16-bit"}
NEW = 16


def _cache(model, method):
    if method == "full":
        return make_eviction_cache("full", model.config)
    params = dict(ratio=0.5)
    if method in ("snapkv", "pyramidkv", "cake", "defensive_kv"):
        params["window"] = 8  # the observation window must fit the tiny prompts' budgets
    return zipkv.make_cache(method, model.config, **params)


def _generate(model, method, ids, mask):
    cache = _cache(model, method)
    return generate_new_tokens(model, cache, ids, mask, NEW), cache


def _eager_held(layer):
    """Per (row, head): the kept keys of an eager EvictingLayer, as a sorted projection."""
    keys, valid = [], []
    for part in layer.parts:
        k, _, ok = part.padded()
        keys.append(k), valid.append(ok)
    keys.append(layer.recent_keys)
    valid.append(layer.recent_real[:, None, :].expand(-1, layer.num_heads, -1))
    return _sorted_sets(torch.cat(keys, 2), torch.cat(valid, 2))


def _sorted_sets(keys, valid):
    projection = torch.linspace(-1, 1, keys.shape[-1])
    return [[(keys[b, h][valid[b, h]].float() @ projection).sort().values for h in range(keys.shape[1])]
            for b in range(keys.shape[0])]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", SUPPORTED + ["full"])
def test_static_decode_equals_generate_with_the_eager_cache(arch, method):
    """Same greedy tokens as model.generate with the eager cache (a left-padded batch), and
    the same kept tokens afterwards: the ring and heavy-hitter slots evict what the eager
    policy evicts."""
    model = tiny_model(arch)
    ids, mask = padded_batch(length=40, pad=6)
    expected, eager = _generate(model, method, ids, mask)
    cache = _cache(model, method)
    tokens = zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=NEW, cuda_graph=False)
    assert torch.equal(tokens, expected)
    assert cache.is_static and cache.get_seq_length() == ids.shape[1] + NEW - 1
    # rows generate() finished are fed pad tokens there, their own predictions here
    eos = model.generation_config.eos_token_id
    running = torch.ones(len(ids), dtype=torch.bool) if eos is None else ~(expected == eos).any(dim=1)
    assert running.any()
    # the decoded tokens' keys differ in the last bits (the eager step attends its own new token
    # unrounded, the static one as stored in fp16); a different kept token would differ by far more
    for static_layer, eager_layer in zip(cache.layers, eager.layers):
        held = _sorted_sets(static_layer.k_buf, static_layer.held_slots())
        for b in running.nonzero().flatten().tolist():
            for got, want in zip(held[b], _eager_held(eager_layer)[b]):
                assert got.shape == want.shape and torch.allclose(got, want, atol=2e-3, rtol=0)
    assert cache.stats().kept_token_heads_per_layer == eager.stats().kept_token_heads_per_layer


@pytest.mark.parametrize("method", ["snapkv", "cake", "streaming_llm", "h2o"])
def test_a_padded_row_equals_the_same_row_alone(method):
    model = tiny_model("llama")
    pad = 6
    ids, mask = padded_batch(length=40, pad=pad)
    batch = zipkv.greedy_decode(model, _cache(model, method), ids, mask, max_new_tokens=NEW, cuda_graph=False,
                                eos_token_id=False)
    alone = zipkv.greedy_decode(model, _cache(model, method), ids[1:, pad:], max_new_tokens=NEW, cuda_graph=False,
                                eos_token_id=False)
    assert torch.equal(batch[1:], alone)


@pytest.mark.parametrize("method", SUPPORTED)
def test_stats_count_the_static_buffers_exactly(method):
    model = tiny_model("llama")
    ids, mask = padded_batch(length=40, pad=6)
    cache = _cache(model, method)
    zipkv.greedy_decode(model, cache, ids, mask, max_new_tokens=8, cuda_graph=False)
    assert all(isinstance(layer, StaticEvictingLayer) and isinstance(layer, StaticLayer) for layer in cache.layers)
    seen = set()
    stats = cache.stats()
    assert stats.bytes_held == sum(held_bytes(layer, seen) for layer in cache.layers) > 0
    assert stats.peak_bytes >= stats.bytes_held


@pytest.mark.parametrize("method", sorted(UNSUPPORTED))
def test_methods_without_a_static_form_say_so_and_keep_the_cache(method):
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=40, pad=0)
    params = {"three_tier": dict(high_bits=16, low_bits=16, window=8)}[method]
    cache = zipkv.make_cache(method, model.config, **params)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    with pytest.raises(ValueError, match=f"{method!r}.*{UNSUPPORTED[method]}"):
        cache.to_static(4)
    assert not cache.is_static
    with torch.no_grad():  # still decodes eagerly
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=2, do_sample=False)


def _streaming_decoder(pad: int, steps: int):
    """(cache, decoder) of a one-layer streaming_llm cache (budget 8) that holds a prompt of
    20 tokens (row 1 left-padded by `pad`), moved to its static form for `steps` steps."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids, mask = padded_batch(length=20, pad=pad)
    cache = zipkv.make_cache("streaming_llm", model.config, budget=8)
    positions = prompt_positions(mask)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                      **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    return cache, StaticDecoder(model, cache, first, positions[:, -1] + 1, steps, mask, cuda_graph=False)


def test_buffers_do_not_move_and_the_ring_turns_on_the_device():
    """What a CUDA graph needs: the same tensors at the same addresses across steps; slots
    come from device counters (the ring's step), not from the host."""
    cache, decoder = _streaming_decoder(pad=3, steps=12)
    layer = cache.layers[0]
    pointers = [t.data_ptr() for t in layer.held_tensors()]
    for _ in range(12):
        decoder.step()
    assert [t.data_ptr() for t in layer.held_tensors()] == pointers
    assert int(layer.slots.step) == 12 and decoder.flushes == 0
    # budget 8 = 4 sinks + 4 recent, plus one free slot (it holds the token evicted last)
    assert layer.k_buf.shape[2] == 9 and layer.kept_token_heads() == 2 * 8 * layer.num_heads
    decoder.step()  # a ring never fills: steps past the ones asked for are fine


def test_stepping_past_the_buffer_is_a_clear_error():
    model = tiny_model("llama", num_hidden_layers=1)
    ids, _ = padded_batch(length=20, pad=0)
    cache = zipkv.make_cache("key_norm", model.config, budget=10)
    positions = prompt_positions(torch.ones_like(ids))
    with torch.inference_mode():
        first = model(input_ids=ids, position_ids=positions, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, cache, first, positions[:, -1] + 1, 3, cuda_graph=False)
    for _ in range(3):
        decoder.step()
    with pytest.raises(RuntimeError, match=r"layers \[0\] are full \(max_steps=3\)"):
        decoder.step()


def test_errors_are_clear():
    model = tiny_model("llama", num_hidden_layers=1)
    ids, _ = padded_batch(length=20, pad=0)
    cache = zipkv.make_cache("snapkv", model.config, budget=10, window=4, kernel_size=3)
    before = [(ValueError, "holds the prompt", lambda: cache.to_static(4)),
              (ValueError, "extra_tokens", lambda: cache.to_static(0))]
    after = [(ValueError, "new, empty", lambda: zipkv.greedy_decode(model, cache, ids, max_new_tokens=3)),
             (NotImplementedError, "keeps its batch rows", lambda: cache.batch_select_indices(torch.tensor([0]))),
             (ValueError, "one token per step", lambda: cache.layers[0].update(*[torch.zeros(2, 2, 2, 16)] * 2)),
             (ValueError, "must be a zipkv cache", lambda: StaticDecoder(model, object(), ids[:, :1], ids[:, 0], 2))]
    for error, match, call in before:
        with pytest.raises(error, match=match):
            call()
    zipkv.greedy_decode(model, cache, ids, max_new_tokens=3, cuda_graph=False)
    for error, match, call in after:
        with pytest.raises(error, match=match):
            call()


def test_nan_states_raise_between_steps():
    """A step cannot stop the graph to check; the flag it sets raises between steps (the
    layer never flushes, so the decoder checks it)."""
    cache, decoder = _streaming_decoder(pad=0, steps=4)
    decoder.step()
    decoder.check_finite()  # nothing wrong yet
    bad = torch.full((2, 2, 1, 16), float("nan"))
    with torch.inference_mode():
        cache.layers[0].update(bad, bad)
    with pytest.raises(ValueError, match="NaN/inf"):
        decoder.check_finite()


needs_gpu = pytest.mark.gpu  # conftest: skipped without a CUDA device (sm80+) or under TRITON_INTERPRET=1


@needs_gpu
@pytest.mark.parametrize("method", ["snapkv", "streaming_llm", "h2o"])
def test_cuda_graph_decode_equals_the_eager_static_path(method):
    """The captured graph replays exactly what the same static step computes uncaptured (the
    same kernels), and agrees with model.generate on the eager cache."""
    pytest.importorskip("triton")
    model = tiny_model("llama", hidden_size=128).cuda()  # head_dim 32: the Triton kernel's smallest
    ids, mask = padded_batch(length=40, pad=6)
    ids, mask = ids.cuda(), mask.cuda()
    expected, _ = _generate(model, method, ids, mask)
    graph_cache = _cache(model, method)
    graph = zipkv.greedy_decode(model, graph_cache, ids, mask, max_new_tokens=NEW, cuda_graph=True)
    plain = zipkv.greedy_decode(model, _cache(model, method), ids, mask, max_new_tokens=NEW, cuda_graph=False)
    assert torch.equal(graph, plain)
    # the kernel reads fp16 queries and keys where generate()'s SDPA reads float32: compare the
    # first tokens, before a near tie can send the two on different paths
    assert torch.equal(graph[:, :4], expected[:, :4])
    seen = set()
    assert graph_cache.stats().bytes_held == sum(held_bytes(layer, seen) for layer in graph_cache.layers)
