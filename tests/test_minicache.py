"""MiniCache: the SLERP merge by hand, restore, storage bytes, generate() on tiny models."""

import math

import pytest
import torch
from transformers import DynamicCache

import zipkv
from zipkv import cache_kwargs
from zipkv.cache.minicache import MiniCache, merged_pairs
from zipkv.cache.minicache_layer import MiniCacheLayer
from zipkv.merge import angular_distance, merge_states, restore_states, retained_count, slerp
from tiny_models import tiny_model, padded_batch
from held_tensors import reachable_tensors


def _restore(merged, side):
    return restore_states(merged.direction, getattr(merged, f"norm_{side}"), merged.retained_index,
                          getattr(merged, f"retained_{side}"), merged.num_tokens)


def _at(degrees, length=1.0):
    r = math.radians(degrees)
    return [length * math.cos(r), length * math.sin(r)]


# ---- the pure merge ------------------------------------------------------------------------

def test_slerp_of_orthogonal_unit_vectors_by_hand():
    e_a, e_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # t = 0.6 of the way from 0 deg to 90 deg: 54 deg
    assert torch.allclose(slerp(e_a, e_b, 0.6), torch.tensor(_at(54)), atol=1e-6)
    assert torch.allclose(slerp(e_a, e_b, 0.0), e_a, atol=1e-7)
    assert torch.allclose(slerp(e_a, e_b, 1.0), e_b, atol=1e-7)
    assert angular_distance(e_a, e_b).item() == pytest.approx(math.pi / 2)


def test_slerp_of_near_parallel_opposite_and_zero_vectors_is_finite():
    e_a = torch.tensor([1.0, 0.0, 0.0])
    e_b = torch.tensor([1.0, 1e-6, 0.0]) / torch.tensor([1.0, 1e-6, 0.0]).norm()
    near = slerp(e_a, e_b, 0.6)
    assert torch.isfinite(near).all() and near.norm().item() == pytest.approx(1.0)
    assert angular_distance(e_a, e_b).item() == pytest.approx(1e-6, rel=1e-2)  # acos would say 0
    assert torch.allclose(slerp(e_a, -e_a, 0.6), -e_a)  # lerp fallback: 0.4 e_a - 0.6 e_a
    assert torch.equal(slerp(e_a, -e_a, 0.5), torch.zeros(3))
    assert torch.equal(slerp(torch.zeros(3), torch.zeros(3), 0.6), torch.zeros(3))


def test_merge_and_retention_by_hand():
    # one row, one head, 4 tokens in 2-D: layer b is layer a turned by 0, 10, 90, 30 degrees
    a = torch.tensor([_at(0, 2.0), _at(20, 1.0), _at(45, 1.0), _at(-10, 4.0)])
    b = torch.tensor([_at(0, 3.0), _at(30, 2.0), _at(135, 1.0), _at(20, 0.5)])
    merged = merge_states(a[None, None], b[None, None], t=0.6, retain_ratio=0.25)
    assert merged.retained_index.tolist() == [[[2]]]  # the 90-degree token stays unmerged
    assert torch.allclose(merged.direction[0, 0], torch.tensor([_at(0), _at(26), _at(8)]), atol=1e-6)
    assert torch.allclose(merged.norm_a[0, 0], torch.tensor([2.0, 1.0, 4.0]))
    assert torch.allclose(merged.norm_b[0, 0], torch.tensor([3.0, 2.0, 0.5]))
    restored_a, restored_b = _restore(merged, "a")[0, 0], _restore(merged, "b")[0, 0]
    assert torch.equal(restored_a[2], a[2]) and torch.equal(restored_b[2], b[2])
    assert torch.allclose(restored_a, torch.tensor([_at(0, 2), _at(26, 1), a[2].tolist(), _at(8, 4)]), atol=1e-6)
    assert torch.allclose(restored_b, torch.tensor([_at(0, 3), _at(26, 2), b[2].tolist(), _at(8, 0.5)]), atol=1e-6)


def test_identical_layers_merge_losslessly():
    x = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    merged = merge_states(x, x.clone(), t=0.6, retain_ratio=0.05)
    assert merged.direction.shape == (2, 3, 40 - 2, 16) and merged.retained_index.shape == (2, 3, 2)
    assert torch.allclose(_restore(merged, "a"), x, atol=1e-6)
    assert torch.allclose(_restore(merged, "b"), x, atol=1e-6)


def test_t0_keeps_layer_a_and_retained_tokens_come_back_exactly():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 2, 50, 8, generator=g), torch.randn(1, 2, 50, 8, generator=g)
    merged = merge_states(a, b, t=0.0, retain_ratio=0.1)
    assert torch.allclose(_restore(merged, "a"), a, atol=1e-6)
    restored_b = _restore(merged, "b")
    assert torch.allclose(restored_b.norm(dim=-1), b.norm(dim=-1), atol=1e-5)  # b's norms, a's directions
    angle = angular_distance(a, b)
    index = merged.retained_index
    assert index.shape[-1] == retained_count(50, 0.1) == 5
    # the retained tokens are the 5 largest angles of each head, and come back exactly
    assert torch.equal(index, angle.topk(5, dim=-1).indices.sort(-1).values)
    gathered = restored_b.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 8))
    assert torch.equal(gathered, b.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, 8)))


def test_zero_vectors_merge_losslessly():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]])
    merged = merge_states(a[None, None], b[None, None], retain_ratio=0.0)
    assert torch.equal(_restore(merged, "a")[0, 0], a)
    assert torch.equal(_restore(merged, "b")[0, 0], b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(t=1.5), r"t must be a number in \[0, 1\]"),
    (dict(t=-0.1), r"t must be a number in \[0, 1\]"),
    (dict(retain_ratio=2.0), r"retain_ratio must be a number in \[0, 1\]"),
])
def test_merge_rejects_bad_fractions(kwargs, match):
    x = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match=match):
        merge_states(x, x, **kwargs)


# ---- the cache -----------------------------------------------------------------------------


def _padded_batch(length=48, pad=9, seed=1, batch=2):
    return padded_batch(length=length, pad=pad, seed=seed, batch=batch)


def _generate(model, cache, ids, mask, n=12, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, **kwargs)


def test_layer_pairs_start_in_the_middle_and_skip_sliding_layers():
    assert merged_pairs(["full_attention"] * 5, 2) == [(2, 3)]
    assert merged_pairs(["full_attention"] * 6, 1) == [(1, 2), (3, 4)]
    hybrid = ["sliding_attention", "full_attention", "full_attention", "sliding_attention", "full_attention"]
    assert merged_pairs(hybrid, 0) == [(1, 2)]
    cache = zipkv.make_cache("minicache", tiny_model("llama", num_hidden_layers=5).config)
    assert [(p.layer_a, p.layer_b) for p in cache.pairs] == [(2, 3)]
    assert [layer.pair is None for layer in cache.layers] == [True, True, False, False, True]


def test_nothing_merged_equals_dynamic_cache_with_padding():
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = _padded_batch()
    expected = _generate(model, DynamicCache(config=model.config), ids, mask)
    cache = zipkv.make_cache("minicache", model.config, start_layer=0, retain_ratio=1.0)
    assert torch.equal(_generate(model, cache, ids, mask), expected)
    assert cache.pairs[0].merged and cache.stats().tokens_per_layer == [ids.shape[1] + 11] * 4


def test_merging_generate_with_padding_and_gqa():
    model = tiny_model("llama", num_hidden_layers=4)  # 4 query heads on 2 KV heads
    ids, mask = _padded_batch(length=64)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        cache = zipkv.make_cache("minicache", model.config, start_layer=0, t=0.6, retain_ratio=0.05)
        # the prefill attends exactly: merging happens behind it
        assert torch.equal(model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache)).logits[:, -1], expected)
    cache = zipkv.make_cache("minicache", model.config, start_layer=0)
    out = _generate(model, cache, ids, mask, n=16)
    assert out.shape == (2, 80)
    stats = cache.stats()
    assert stats.tokens_per_layer == [79] * 4  # logical length: positions continue right
    assert stats.ratio > 1.4
    assert all(pair.merged and pair.pending is None for pair in cache.pairs)


def test_question_on_top_of_a_merged_context_reads_the_restored_states_in_place():
    """Several tokens on top of a merged cache: the same logits as a DynamicCache holding
    exactly the restored states, so order, padding columns, positions and mask all line up."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = _padded_batch(length=64)
    question = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(2))
    full_mask = torch.cat([mask, torch.ones_like(question)], 1)
    cache = zipkv.make_cache("minicache", model.config, start_layer=2, retain_ratio=0.25)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        oracle = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            oracle.update(*layer.attention_inputs(), i)
        expected = model(input_ids=question, attention_mask=full_mask, **cache_kwargs(oracle)).logits
        got = model(input_ids=question, attention_mask=full_mask, **cache_kwargs(cache)).logits
    # the question's own states are stored in fp16 by the cache: rounding only (a merged
    # context differs from the full one by about 0.2 here)
    assert (got - expected).abs().max() < 2e-3
    assert cache.get_seq_length() == oracle.get_seq_length() == 70


def test_hybrid_sliding_model_generates():
    model = tiny_model("gemma3", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    ids, mask = _padded_batch(length=20, pad=3)
    cache = zipkv.make_cache("minicache", model.config, start_layer=0)
    assert cache.pairs == [] and cache.lossless  # no two full-attention layers are adjacent
    expected = _generate(model, DynamicCache(config=model.config), ids, mask, n=6)
    assert torch.equal(_generate(model, cache, ids, mask, n=6), expected)



@pytest.mark.parametrize("direction_bits", [16, 4])
def test_stats_count_every_tensor_held_once(direction_bits):
    model = tiny_model("llama", num_hidden_layers=3)  # layer 0 plain, layers 1-2 one pair
    ids, mask = _padded_batch(length=40)
    cache = zipkv.make_cache("minicache", model.config, start_layer=1, direction_bits=direction_bits)
    _generate(model, cache, ids, mask, n=5)
    seen = set()
    reachable = [t for layer in cache.layers for t in reachable_tensors(layer, seen)]
    assert sum(t.numel() * t.element_size() for t in reachable) == cache.stats().bytes_held
    # by hand: batch 2, 2 KV heads, head dim 16, 40 prompt tokens (2 retained), 4 decoded
    b, h, d, n, k, new = 2, 2, 16, 40, 2, 4
    fp16_token = b * h * d * 2
    plain = 2 * (n + new) * fp16_token  # layer 0: keys + values
    tail = 2 * 2 * new * fp16_token  # decoded tokens of both paired layers
    norms = 2 * 2 * b * h * (n - k) * 2  # layers x (keys, values) x fp16
    retained = 2 * 2 * k * fp16_token + 2 * b * h * k * 4  # states + int32 positions
    pair = cache.pairs[0]
    if direction_bits == 16:
        direction = 2 * (n - k) * fp16_token
        assert [t.dtype for t in pair.direction.tensors()] == [torch.float16] * 2
    else:
        direction = sum(t.numel() * t.element_size() for t in pair.direction.tensors())
        codes = 2 * b * h * (n - k) * d * 4 // 8
        assert codes < direction < 2 * codes  # codes plus their scales and minimums
    stats = cache.stats()
    assert stats.bytes_held == plain + tail + norms + retained + direction
    assert stats.bytes_per_layer[2] == tail // 2  # the pair's shared tensors are counted by layer 1
    assert stats.fp16_bytes == 3 * 2 * (n + new) * fp16_token
    assert stats.ratio > 1.0


def test_quantized_directions_hold_fewer_bytes_and_stay_close():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = _padded_batch(length=64)
    held, logits = {}, {}
    for bits in (16, 4):
        cache = MiniCache(model.config, start_layer=0, direction_bits=bits)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
            logits[bits] = model(input_ids=ids[:, -1:], **cache_kwargs(cache),
                                 attention_mask=torch.cat([mask, mask[:, -1:]], 1)).logits
        held[bits] = cache.stats().bytes_held
    assert held[4] < 0.75 * held[16]
    assert (logits[4] - logits[16]).abs().max() < 0.1 * logits[16].abs().max()


def test_batch_selection_moves_the_shared_pair_once():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = _padded_batch(length=30)
    cache = zipkv.make_cache("minicache", model.config, start_layer=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    before = [layer.attention_inputs() for layer in cache.layers]
    cache.batch_select_indices(torch.tensor([1]))
    for layer, (keys, values) in zip(cache.layers, before):
        after_keys, after_values = layer.attention_inputs()
        assert torch.equal(after_keys, keys[1:]) and torch.equal(after_values, values[1:])
    cache.batch_repeat_interleave(2)
    assert cache.layers[1].attention_inputs()[0].shape[0] == 2
    assert torch.equal(cache.layers[1].attention_inputs()[0][1], before[1][0][1])


def test_prefill_from_recorded_states_matches_a_live_prefill():
    from zipkv.eviction_cache import record_prefill

    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = _padded_batch(length=32)
    records, _, _ = record_prefill(model, ids, mask)
    replayed = zipkv.make_cache("minicache", model.config).prefill_from_states(records)
    live = zipkv.make_cache("minicache", model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(live))
    for a, b in zip(replayed.layers, live.layers):
        assert all(torch.equal(x, y) for x, y in zip(a.attention_inputs(), b.attention_inputs()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(t=1.2), r"t must be a number in \[0, 1\] \(got 1.2\)"),
    (dict(t="0.6"), r"t must be a number in \[0, 1\]"),
    (dict(retain_ratio=-0.5), r"retain_ratio must be a number in \[0, 1\] \(got -0.5\)"),
    (dict(start_layer=-1), r"start_layer must be None or an integer >= 0 \(got -1\)"),  # model-independent: the registry
    (dict(start_layer=4), r"start_layer must be an integer in \[0, 3\] \(got 4\)"),
    (dict(start_layer=1.5), r"start_layer must be None or an integer >= 0 \(got 1.5\)"),
    (dict(direction_bits=3), r"direction_bits must be one of \(2, 4, 8, 16\) \(got 3\)"),
])
def test_invalid_settings_name_the_parameter_and_range(kwargs, match):
    config = tiny_model("llama", num_hidden_layers=4).config
    with pytest.raises(ValueError, match=match):
        zipkv.make_cache("minicache", config, **kwargs)


def test_leaves_the_attention_implementation_alone_and_rejects_empty_updates():
    model = tiny_model("llama")
    attn = model.config._attn_implementation
    zipkv.make_cache("minicache", model.config)
    assert model.config._attn_implementation == attn
    with pytest.raises(ValueError, match="no tokens"):
        MiniCacheLayer(0).update(torch.randn(1, 1, 0, 8), torch.randn(1, 1, 0, 8))
    assert "minicache" in str(pytest.raises(ValueError, zipkv.make_cache, "nope", model.config).value)
