"""ZipVL sparse prefill wired into the evicting cache: tau = 1 equals the dense prefill,
rows outside the important set are zero and rows inside equal attention restricted to it,
the selection is computed once, the FLOP report matches a hand count, clear errors."""

from types import SimpleNamespace

import pytest
import torch

import zipkv
from zipkv import cache_kwargs
import zipkv.policies.tiered as policies
from zipkv.cache.eviction_cache import record_prefill
from zipkv.policies.zipvl_probes import probe_positions
from zipkv.eviction import ZipCacheScorer, rank_tokens, zipvl_important_count
from zipkv.eviction.scorers.base import window_attention
from zipkv.eviction_cache import make_eviction_cache
from zipkv.kernels.sparse_prefill import pad_keep_indices, sparse_prefill_reference, sparse_prefill_scatter
from tiny_models import tiny_model, padded_batch

D, HKV, HQ = 16, 2, 4  # tiny models: head dim 16, 2 KV heads, 4 query heads
PROBES = dict(probe_recent=4, probe_random=4)



def _batch(length=40, pad=6, seed=1, batch=2):
    return padded_batch(length=length, pad=pad, seed=seed, batch=batch)


@pytest.mark.parametrize("method", ["zipvl", "zipvl_v2"])
def test_tau_one_keeps_everything_and_equals_the_dense_prefill(method):
    model = tiny_model("llama")
    ids, mask = _batch()
    caches = {sp: make_eviction_cache(method, model.config, tau=1.0, stream_interval=4, sparse_prefill=sp, **PROBES)
              for sp in (False, True)}
    with torch.no_grad():
        logits = {sp: model(input_ids=ids, attention_mask=mask, **cache_kwargs(c)).logits for sp, c in caches.items()}
    report = caches[True].sparse_prefill_report()
    assert caches[False].sparse_prefill_report() is None and caches[False].stats().sparse_prefill is None
    assert report.kept_fraction == 1.0 and report.flop_saving == 0.0
    assert [r.kept for r in report.layers] == [[40, 34]] * 2  # every real token; padding never
    # real positions: equal (padding positions legitimately differ: their attention is skipped)
    torch.testing.assert_close(logits[True][0], logits[False][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[True][1, 6:], logits[False][1, 6:], rtol=0, atol=1e-5)
    outs = []
    for sp in (False, True):
        cache = make_eviction_cache(method, model.config, tau=1.0, stream_interval=4, sparse_prefill=sp, **PROBES)
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache),
                                       max_new_tokens=10, do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def _hand_case(seed=5, s=24, pad=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HQ, s, D, generator=g)
    k = torch.randn(2, HKV, s, D, generator=g) * 2  # peaky attention: a small important set
    v = torch.randn(2, HKV, s, D, generator=g)
    real = torch.ones(2, s, dtype=torch.bool)
    real[1, :pad] = False
    # the model's 4-D mask: the layer reads the new tokens' padding from its last row
    mask4d = (torch.ones(s, s, dtype=torch.bool).tril()[None, None] & real[:, None, None, :])
    return q, k, v, real, mask4d


def _attend(cache, q, k, v, mask4d):
    layer = cache.layers[0]
    layer.update(k, v)
    out, _ = layer.attend(SimpleNamespace(training=False), q, k, v, mask4d, D ** -0.5)
    return layer, out.transpose(1, 2)  # [B, Hq, S, D]


@pytest.mark.parametrize("method,params", [("zipvl", {}), ("zipvl_v2", dict(budget=3))])
def test_rows_outside_the_important_set_are_zero_rows_inside_attend_within_it(method, params):
    tau = 0.6
    model = tiny_model("llama")
    q, k, v, real, mask4d = _hand_case()
    cache = make_eviction_cache(method, model.config, tau=tau, sparse_prefill=True, keep_model_dtype=True,
                                **PROBES, **params)
    layer, out = _attend(cache, q, k, v, mask4d)
    important = layer.sparse_prefill_record.important
    s = q.shape[2]
    assert bool(important.any(1).all()) and not bool(important[~real].any())  # never padding
    assert bool(important[:, s - 4:].all())  # the recent probes (incl. the last token) always
    assert int(important.sum()) < int(real.sum())  # really sparse in this case
    for b in range(2):
        rows = important[b].nonzero()[:, 0]
        assert torch.equal(out[b][:, ~important[b]], torch.zeros_like(out[b][:, ~important[b]]))
        expected = sparse_prefill_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], rows[None])[0]
        torch.testing.assert_close(out[b][:, rows], expected, rtol=0, atol=1e-5)

    # T by hand: the probes' tau count of the best tokens by the head-averaged normalized
    # score, plus the recent probes; the tier split used the same count
    positions = probe_positions(real, 4, 4, 0)
    att = window_attention(q[:, :, positions], k, real, query_positions=positions, scaling=D ** -0.5)
    high = zipvl_important_count(att, tau)
    if "budget" in params:
        high = high.clamp(max=params["budget"])
    by_hand = rank_tokens(ZipCacheScorer().score_attention(att).mean(1)) < high[:, None]
    by_hand[:, s - 4:] = True
    assert torch.equal(important, by_hand & real)
    assert torch.equal(layer.tier_stores["high"].lengths[:, 0], high)


def test_batched_end_padded_indices_equal_each_row_alone():
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(3, HQ, 30, D, generator=g), torch.randn(3, HKV, 30, D, generator=g), \
        torch.randn(3, HKV, 30, D, generator=g)
    keep = torch.rand(3, 30, generator=g) < torch.tensor([[0.2], [0.6], [0.9]])
    keep[:, -1] = True
    idx, counts = pad_keep_indices(keep)
    assert idx.shape == (3, int(counts.max())) and torch.equal(counts, keep.sum(1))
    out = sparse_prefill_scatter(q, k, v, idx, counts)
    for b in range(3):
        rows = keep[b].nonzero()[:, 0]
        alone = sparse_prefill_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], rows[None])[0]
        torch.testing.assert_close(out[b][:, rows], alone, rtol=0, atol=1e-5)
        assert bool((out[b][:, ~keep[b]] == 0).all())


def test_selection_is_computed_once_per_layer(monkeypatch):
    calls = []
    original = policies.window_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(policies, "window_attention", counting)
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = _batch()
    for sparse in (False, True):
        calls.clear()
        cache = make_eviction_cache("zipvl", model.config, tau=0.9, sparse_prefill=sparse, **PROBES)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        assert len(calls) == 3  # one probe attention per layer, before attention when sparse
        assert all(layer.prefill_selection is None for layer in cache.evicting_layers())  # consumed


def test_flop_report_matches_a_hand_count():
    model = tiny_model("llama")
    ids, mask = _batch(length=10, pad=3)
    cache = make_eviction_cache("zipvl", model.config, tau=1.0, sparse_prefill=True, probe_recent=2, probe_random=2)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    report = cache.sparse_prefill_report()
    # causal attention over n tokens: n(n+1)/2 (query, key) pairs, Q K^T and P V at 2 * D FLOPs
    # each, 4 query heads; rows of 10 and 7 real tokens
    dense_per_layer = 4 * (2 * D + 2 * D) * (10 * 11 // 2 + 7 * 8 // 2)
    assert [r.kept for r in report.layers] == [[10, 7]] * 2
    assert report.dense_flops == report.sparse_flops == 2 * dense_per_layer == 2 * 21248
    # 4 probes (2 recent, 2 random) x 10 keys x 2 rows, Q K^T only
    assert report.probe_flops == 2 * (2 * 4 * D * 4 * 10 * 2)
    assert cache.stats().sparse_prefill == report.to_dict()

    cache = make_eviction_cache("zipvl", model.config, tau=0.5, sparse_prefill=True, probe_recent=2, probe_random=2)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
    report = cache.sparse_prefill_report()
    kept = [r.kept for r in report.layers]
    sparse = sum(4 * (4 * D) * (n * (n + 1) // 2) for layer in kept for n in layer)
    assert report.sparse_flops == sparse < report.dense_flops == 2 * 21248
    assert report.flop_saving == pytest.approx(1 - sparse / 42496)
    assert report.kept_fraction == pytest.approx(sum(map(sum, kept)) / 34)
    assert report.kept_fraction_per_layer == pytest.approx([sum(n) / 17 for n in kept])
    assert f"attention FLOPs {-100 * (1 - sparse / 42496):+.1f}%" in str(report)


def test_clear_errors():
    model = tiny_model("llama")
    for method, params in (("snapkv", dict(ratio=0.2)), ("h2o", dict(ratio=0.2)), ("mikv", dict(ratio=0.2)),
                           ("three_tier", {}), ("full", {})):
        with pytest.raises(ValueError, match=f"sparse_prefill needs ZipVL's important set .*; {method} has none"):
            make_eviction_cache(method, model.config, sparse_prefill=True, **params)
    for method in ("zipcache", "kivi", "full"):  # quantizing presets through zipkv.make_cache
        with pytest.raises(ValueError, match=f"sparse_prefill needs ZipVL's important set .*; {method} has none"):
            zipkv.make_cache(method, model.config, sparse_prefill=True)
    assert zipkv.make_cache("zipvl", model.config, sparse_prefill=True).policy.sparse_prefill
    with pytest.raises(ValueError, match="rule 'ratios' has none"):
        policies.TieredPolicy(rule="ratios", scorer=object(), sparse_prefill=True)
    with pytest.raises(ValueError, match="sparse_prefill must be True or False"):
        make_eviction_cache("zipvl", model.config, sparse_prefill="yes")
    ids, mask = _batch(length=12)
    records, _, _ = record_prefill(model, ids, mask)
    with pytest.raises(ValueError, match="cannot be built from states recorded by a dense prefill"):
        make_eviction_cache("zipvl", model.config, sparse_prefill=True, **PROBES).prefill_from_states(records)
