"""Evicting caches: memory really freed, budgets kept while decoding, cascading prefill,
selection rules checked against brute force, recorded prefills, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from zipkv import cache_kwargs
from zipkv.cache.eviction_cache import record_prefill
from zipkv.cache.eviction_store import Fp16Store, PackedStore
from zipkv.eviction import adakv_head_budgets, pyramid_budgets, zipvl_important_count
from zipkv.eviction.scorers.base import window_attention
from zipkv.eviction_cache import make_eviction_cache
from test_eviction_cache_positions import held_positions
from tiny_models import tiny_model, padded_batch
from held_tensors import reachable_tensors

D, HKV, HQ = 16, 2, 4  # tiny models: head dim 16, 2 KV heads, 4 query heads


def _batch(length=48, pad=6, seed=1, batch=2):
    return padded_batch(length=length, pad=pad, seed=seed, batch=batch)


def _prefill(model, cache, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache)).logits


SNAP = dict(window=6, kernel_size=3)


# -- memory -----------------------------------------------------------------------------------
def test_fp16_bytes_equal_kept_tokens_storage_dense_and_ragged():
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = _batch()
    real = mask.sum(1)  # 48, 42
    for method in ("snapkv", "adakv"):
        cache = make_eviction_cache(method, model.config, ratio=0.25, **SNAP)
        _prefill(model, cache, ids, mask)
        budgets = torch.floor(0.25 * real + 0.5).long()  # per sequence: 12, 11 (padding dropped)
        ragged = False
        for layer in cache.evicting_layers():
            (store,) = layer.parts
            assert torch.equal(store.lengths.sum(1), budgets * HKV)
            kept = int(store.lengths.sum())
            layout = 0 if store.offsets is None else store.offsets.numel() * 8
            # recent part is empty after a prefill-only eviction: nothing else is held
            assert layer.nbytes() == kept * 2 * D * 2 + layout
            ragged |= bool((store.lengths != store.lengths[:, :1]).any())
        stats = cache.stats()
        assert stats.bytes_held == sum(stats.bytes_per_layer) < 0.3 * stats.fp16_bytes
        if method == "adakv":
            assert ragged, "AdaKV head budgets should differ across heads and be stored ragged"


def test_packed_bytes_equal_kept_tokens_storage():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = _batch()
    cache = make_eviction_cache("three_tier", model.config, high_ratio=0.25, low_ratio=0.25, **SNAP)
    _prefill(model, cache, ids, mask)
    real = mask.sum(1)
    n = torch.floor(0.25 * real + 0.5).long()  # per sequence and tier
    for layer in cache.evicting_layers():
        low, high = layer.parts
        assert isinstance(low, PackedStore) and (low.bits, high.bits) == (2, 4)
        assert torch.equal(low.lengths[:, 0], n) and torch.equal(high.lengths[:, 0], n)
        expected = 0
        for store in (low, high):
            for tier in store.tiers():
                tokens = tier.num_tokens * HKV  # one tier per row here: [1, H, n, D]
                codes = tokens * 2 * D * store.bits // 8
                value_params = tokens * 2 * 2  # fp16 scale + min per token (one value group)
                key_params = tier.k_scale.numel() * 2 * 2  # fp16 scale + min per (head, group, channel)
                channel = tier.v_channel.numel() * 2
                bounds = (tier.group_ends.numel() + tier.chunk_ends.numel()) * 4
                assert tier.nbytes() == codes + value_params + key_params + channel + bounds
                expected += tier.nbytes()
        assert layer.nbytes() == expected  # nothing but the kept tokens' storage
        assert layer.nbytes() < 0.5 * 2 * int(n.sum()) * HKV * 2 * D * 2  # far below fp16 for those tokens



@pytest.mark.parametrize("method,params", [
    ("h2o", dict(ratio=0.3)), ("adakv", dict(ratio=0.3, **SNAP)), ("zipvl", dict(stream_interval=4)),
    ("cake", dict(ratio=0.3, **SNAP)),
])
def test_stats_count_every_tensor_held(method, params):
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = _batch()
    cache = make_eviction_cache(method, model.config, **params)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=7, do_sample=False,
                       pad_token_id=0)
    for i, layer in enumerate(cache.evicting_layers()):
        reachable = reachable_tensors(layer)
        assert sum(t.numel() * t.element_size() for t in reachable) == cache.stats().bytes_per_layer[i]
    assert not cache.stats().masked_only


# -- budgets while decoding, cascading prefill ----------------------------------------------------
@pytest.mark.parametrize("method", ["h2o", "streaming_llm"])
def test_budget_respected_at_every_decoding_step(method):
    model = tiny_model("qwen2", num_hidden_layers=2)
    ids, mask = _batch()
    cache = make_eviction_cache(method, model.config, ratio=0.25)
    budgets = torch.floor(0.25 * mask.sum(1) + 0.5).long()  # 12 and 11
    tokens = ids
    with torch.no_grad():
        for step in range(8):
            logits = model(input_ids=tokens, attention_mask=mask, **cache_kwargs(cache)).logits
            for layer in cache.evicting_layers():
                (store,) = layer.parts
                assert torch.equal(store.lengths, budgets[:, None].expand(-1, HKV)), step
                assert layer.recent_keys.shape[2] == 0
            tokens = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    assert cache.get_seq_length() == 48 + 7


def test_cake_cascade_keeps_prefill_peak_below_the_full_prompt_cache():
    layers = 6
    model = tiny_model("llama", num_hidden_layers=layers)
    ids, _ = _batch(length=64, batch=1)
    cache = make_eviction_cache("cake", model.config, budget=16, **SNAP)
    _prefill(model, cache, ids)
    full_layer = 64 * HKV * D * 2 * 2  # one layer's fp16 prompt cache
    total_budget = layers * 16 * HKV * D * 2 * 2
    assert cache.peak_bytes < 0.5 * layers * full_layer
    # the peak: the earlier layers already within the total, plus one layer's whole prompt
    assert cache.peak_bytes <= total_budget + full_layer
    kept = [int(layer.parts[0].lengths[0, 0]) for layer in cache.evicting_layers()]
    assert sum(kept) <= layers * 16 and min(kept) >= 6 and len(set(kept)) > 1  # preference-shaped
    assert all(not layer.parts[0].extras for layer in cache.evicting_layers())  # bookkeeping freed


# -- selection rules, checked against brute force ------------------------------------------------
def _records(model, ids):
    records, _, _ = record_prefill(model, ids)
    return records


def _held(cache, records):
    return [held_positions(layer, rec.keys) for layer, rec in zip(cache.evicting_layers(), records)]


def _attention(rec, rows):
    """float64 softmax of query rows `rows` over all keys, causal: [B, Hkv, G, len(rows), T]."""
    q = rec.query[:, :, rows].double()
    k = rec.keys.double().repeat_interleave(HQ // HKV, 1)
    logits = q @ k.transpose(-1, -2) * rec.scaling
    t = rec.keys.shape[2]
    visible = torch.arange(t)[None, :] <= torch.as_tensor(rows)[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    return probs.reshape(1, HKV, HQ // HKV, len(rows), t)


def test_streaming_llm_keeps_sinks_and_recent():
    model = tiny_model("llama")
    ids, _ = _batch(length=30, batch=1)
    records = _records(model, ids)
    cache = make_eviction_cache("streaming_llm", model.config, budget=10, keep_model_dtype=True)
    cache.prefill_from_states(records)
    expected = torch.zeros(30, dtype=torch.bool)
    expected[:4] = expected[24:] = True  # 4 sinks + the 6 most recent
    for keep in _held(cache, records):
        assert torch.equal(keep, expected.expand(1, HKV, 30))


def test_h2o_keeps_heavy_hitters_and_recent_half():
    model = tiny_model("llama")
    ids, _ = _batch(length=30, batch=1)
    records = _records(model, ids)
    cache = make_eviction_cache("h2o", model.config, budget=12, keep_model_dtype=True)
    cache.prefill_from_states(records)
    for keep, rec in zip(_held(cache, records), records):
        totals = _attention(rec, list(range(30))).sum(3).mean(2)[0]  # [Hkv, T]
        for h in range(HKV):
            heavy = totals[h, :24].topk(6).indices
            expected = torch.zeros(30, dtype=torch.bool)
            expected[24:] = True
            expected[heavy] = True
            assert torch.equal(keep[0, h], expected)


def test_snapkv_pyramid_adakv_follow_their_rules():
    model = tiny_model("llama", num_hidden_layers=3)
    ids, _ = _batch(length=40, batch=1)
    records = _records(model, ids)
    w, c = 6, 16
    snap = make_eviction_cache("snapkv", model.config, budget=c, keep_model_dtype=True, **SNAP)
    snap.prefill_from_states(records)
    for keep, rec in zip(_held(snap, records), records):
        votes = _attention(rec, list(range(40 - w, 40))).sum(3).float()  # [1, Hkv, G, T]
        pooled = F.max_pool1d(votes[..., : 40 - w].reshape(-1, 1, 40 - w), 3, 1, 1).reshape(1, HKV, -1, 40 - w)
        scores = pooled.mean(2)[0]
        for h in range(HKV):
            expected = torch.zeros(40, dtype=torch.bool)
            expected[40 - w :] = True
            expected[scores[h].topk(c - w).indices] = True
            assert torch.equal(keep[0, h], expected)
    pyramid = make_eviction_cache("pyramidkv", model.config, budget=c, beta=4.0, keep_model_dtype=True, **SNAP)
    pyramid.prefill_from_states(records)
    counts = [int(layer.parts[0].lengths[0, 0]) for layer in pyramid.evicting_layers()]
    assert counts == pyramid_budgets(3, c, 40, window=w, beta=4.0) and counts[0] > counts[-1]
    ada = make_eviction_cache("adakv", model.config, budget=c, keep_model_dtype=True, **SNAP)
    ada.prefill_from_states(records)
    for layer, keep in zip(ada.evicting_layers(), _held(ada, records)):
        lengths = layer.parts[0].lengths
        assert int(lengths.sum()) == HKV * c and torch.equal(keep.sum(-1), lengths)
        # the head budgets are AdaKV's, computed from the same SnapKV scores
        scores = make_eviction_cache("snapkv", model.config, budget=c, **SNAP).policy.scorer.score(
            records[layer.eviction_position].keys, records[layer.eviction_position].query,
            scaling=records[layer.eviction_position].scaling)
        assert torch.equal(lengths, adakv_head_budgets(scores, c, alpha=0.2))


def test_zipvl_important_tokens_high_bit_rest_low_or_evicted():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, _ = _batch(length=40, batch=1)
    records = _records(model, ids)
    for method in ("zipvl", "zipvl_v2"):
        cache = make_eviction_cache(method, model.config, tau=0.8, probe_recent=4, probe_random=4, stream_interval=5)
        cache.prefill_from_states(records)
        for layer, rec in zip(cache.evicting_layers(), records):
            rows = torch.tensor([*sorted(torch.randperm(32, generator=torch.Generator().manual_seed(0))[:4].tolist()),
                                 36, 37, 38, 39])
            att = window_attention(rec.query[:, :, rows], rec.keys, query_positions=rows, scaling=rec.scaling)
            important = int(zipvl_important_count(att, 0.8)[0])
            high = layer.tier_stores["high"]
            assert int(high.lengths[0, 0]) == important < 40
            low = layer.tier_stores.get("low")
            kept_low = 0 if low is None else int(low.lengths[0, 0])
            assert kept_low == (40 - important if method == "zipvl" else 0)
        # decoding: every 5 tokens the block is split by the same rule
        tokens = ids[:, -1:]
        with torch.no_grad():
            for step in range(5):
                tokens = model(input_ids=tokens, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        for layer in cache.evicting_layers():
            held = sum(int(p.lengths[0, 0]) for p in layer.parts)
            assert layer.recent_keys.shape[2] == 0 and held <= 45


def test_causal_chunked_h2o_totals_equal_the_scorers_accumulate():
    from zipkv.policies import ContinuousPolicy
    from zipkv.eviction import H2OScorer

    g = torch.Generator().manual_seed(3)
    keys, query = torch.randn(2, HKV, 37, D, generator=g), torch.randn(2, HQ, 37, D, generator=g)
    real = torch.ones(2, 37, dtype=torch.bool)
    real[1, :5] = False
    fast = ContinuousPolicy(budget=8, query_chunk=8)._prefill_totals(keys, query, real, 0.25)
    slow = H2OScorer().accumulate(keys, query, real, scaling=0.25)
    assert torch.allclose(fast, slow, atol=1e-5) and torch.equal(fast.isneginf(), slow.isneginf())


# -- recorded prefills -----------------------------------------------------------------------
@pytest.mark.parametrize("method,params", [
    ("snapkv", dict(ratio=0.3, **SNAP)), ("h2o", dict(ratio=0.3)), ("cake", dict(ratio=0.3, **SNAP)),
    ("zipvl", dict(probe_recent=4, probe_random=4)),
])
def test_cache_built_from_a_recorded_prefill_equals_a_live_one(method, params):
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = _batch()
    live = make_eviction_cache(method, model.config, **params)
    _prefill(model, live, ids, mask)
    records, _, _ = record_prefill(model, ids, mask)
    built = make_eviction_cache(method, model.config, **params).prefill_from_states(records)
    assert live.stats().to_dict() | {"peak_bytes": 0} == built.stats().to_dict() | {"peak_bytes": 0}
    step = torch.tensor([[5], [7]])
    mask = torch.cat([mask, torch.ones_like(step)], 1)
    with torch.no_grad():
        a = model(input_ids=step, attention_mask=mask, **cache_kwargs(live)).logits
        b = model(input_ids=step, attention_mask=mask, **cache_kwargs(built)).logits
    assert torch.allclose(a, b, atol=1e-5)


# -- errors --------------------------------------------------------------------------------
def test_clear_errors():
    model = tiny_model("llama")
    ids, _ = _batch(length=20, batch=1)
    cache = make_eviction_cache("snapkv", model.config, budget=30, **SNAP)
    with pytest.raises(ValueError, match=r"budget=30 is larger than the prompt \(20 tokens\)"):
        _prefill(model, cache, ids)
    cache = make_eviction_cache("snapkv", model.config, ratio=0.1, **SNAP)
    with pytest.raises(ValueError, match="fewer than the 6 tokens the method always keeps"):
        _prefill(model, cache, ids)
    for tau in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"tau=.* outside the allowed range \(0, 1\]"):
            make_eviction_cache("zipvl_v2", model.config, tau=tau)
    with pytest.raises(ValueError, match="kernel_size=7 is larger than the observation window=4"):
        make_eviction_cache("snapkv", model.config, ratio=0.2, window=4, kernel_size=7)
    with pytest.raises(ValueError, match="ratio=1.5 is outside"):
        make_eviction_cache("h2o", model.config, ratio=1.5)
    with pytest.raises(ValueError, match="exactly one of budget"):
        make_eviction_cache("h2o", model.config)
    with pytest.raises(ValueError, match="method must be one of"):
        make_eviction_cache("lru", model.config, ratio=0.2)
    with pytest.raises(ValueError, match=r"snapkv does not take \['tau'\]"):
        make_eviction_cache("snapkv", model.config, ratio=0.2, tau=0.5)
    flash = tiny_model("llama").config
    flash._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'h2o' needs the attention weights"):
        make_eviction_cache("h2o", flash, ratio=0.2)


def test_fp16_store_flat_layout_round_trip():
    """Ragged selection -> flat store -> right-aligned rectangle gives back exactly the kept tokens."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 9, 4, generator=g), torch.randn(2, 3, 9, 4, generator=g)
    keep = torch.rand(2, 3, 9, generator=g) > 0.5
    store = Fp16Store.select(keys, values, keep)
    assert store.offsets is not None and store.keys.shape == (int(keep.sum()), 4)
    k, v, valid = store.padded()
    for b in range(2):
        for h in range(3):
            assert torch.equal(k[b, h][valid[b, h]], keys[b, h][keep[b, h]])
            assert torch.equal(v[b, h][valid[b, h]], values[b, h][keep[b, h]])
            assert not valid[b, h, : k.shape[2] - int(keep[b, h].sum())].any()  # holes first
