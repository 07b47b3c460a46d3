"""Properties of every scorer and of the selection on random inputs: budget respected,
padding never kept over real tokens, left padding does not change a row's scores,
GQA averaging, determinism, and agreement with a brute-force top-k."""

import pytest
import torch

from zipkv.eviction import SCORERS, H2OScorer, assign_tiers, make_scorer, select_tokens

WINDOW_SCORERS = ("snapkv", "cake", "defensive_kv")
SEEDS = range(3)


def scorer_for(name):
    return make_scorer(name, window=8, kernel_size=5) if name in WINDOW_SCORERS else make_scorer(name)


def random_batch(seed, b=3, hkv=2, groups=2, d=8):
    gen = torch.Generator().manual_seed(seed)
    t = int(torch.randint(30, 60, (1,), generator=gen))
    keys = torch.randn(b, hkv, t, d, generator=gen)
    queries = torch.randn(b, hkv * groups, t, d, generator=gen)
    pads = torch.randint(0, t - 16, (b,), generator=gen)  # every row keeps >= 16 real tokens
    pads[0] = 0
    mask = (torch.arange(t)[None, :] >= pads[:, None]).long()
    return keys, queries, mask, pads.tolist(), gen


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("seed", SEEDS)
def test_scores_padding_determinism_and_padding_invariance(name, seed):
    keys, queries, mask, pads, _ = random_batch(seed)
    scorer = scorer_for(name)
    scores = scorer.score(keys, queries, mask)
    assert scores.shape == keys.shape[:3] and scores.dtype == torch.float32
    assert not torch.isnan(scores).any()
    real = mask.bool()[:, None, :].expand_as(scores)
    assert torch.isneginf(scores[~real]).all() and not torch.isneginf(scores[real]).any()
    assert scorer.score(keys, queries, mask).equal(scores)  # deterministic
    for row, pad in enumerate(pads):  # a left-padded row scores like the same sequence alone
        alone = scorer.score(keys[row:row + 1, :, pad:], queries[row:row + 1, :, pad:])
        torch.testing.assert_close(scores[row:row + 1, :, pad:], alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "cake", "zipcache"])
def test_gqa_heads_are_averaged(name):
    keys, queries, mask, _, _ = random_batch(7, hkv=1, groups=2)
    scorer = scorer_for(name)
    both = scorer.score(keys, queries, mask)
    each = [scorer.score(keys, queries[:, g:g + 1], mask) for g in range(2)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2, rtol=1e-5, atol=1e-7)


def test_h2o_chunked_prefill_equals_one_pass():
    keys, queries, mask, _, _ = random_batch(11)
    torch.testing.assert_close(H2OScorer(query_chunk=7).score(keys, queries, mask),
                               H2OScorer().score(keys, queries, mask))


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("seed", SEEDS)
def test_selection_respects_budget_and_never_keeps_padding_over_real(name, seed):
    keys, queries, mask, pads, gen = random_batch(seed)
    scores = scorer_for(name).score(keys, queries, mask)
    t = scores.shape[-1]
    for budget in (int(torch.randint(8, t + 1, (1,), generator=gen)), t - 1, 8):
        index = select_tokens(scores, budget)
        dense = index.dense()
        assert dense.shape == (*scores.shape[:2], budget)
        assert (dense[..., 1:] > dense[..., :-1]).all()  # logical order, no repeats
        held = index.to_mask()
        for row, pad in enumerate(pads):
            real_len = t - pad
            padding_held = held[row, :, :pad].sum(-1)
            # padding only where the real tokens cannot fill the budget
            assert (padding_held == max(0, budget - real_len)).all()
        protected = torch.isposinf(scores)
        if budget >= int(protected.sum(-1).max()):
            assert held[protected].all()  # window / sinks always survive
        ragged = select_tokens(scores, budget, drop_padding=True)
        assert not ragged.to_mask()[~mask.bool()[:, None, :].expand_as(scores)].any()


@pytest.mark.parametrize("seed", SEEDS)
def test_selection_matches_brute_force_topk(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, 50, generator=gen)  # continuous: no ties
    budget = int(torch.randint(0, 51, (1,), generator=gen))
    held = select_tokens(scores, budget).to_mask()
    expected = torch.zeros_like(held).scatter_(-1, scores.topk(budget, dim=-1).indices, True)
    assert held.equal(expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_tiers_partition_tokens_by_score(seed):
    gen = torch.Generator().manual_seed(seed)
    b, h, t = 2, 3, 40
    scores = torch.randn(b, h, t, generator=gen)
    high = torch.randint(0, 20, (b, h), generator=gen)
    low = torch.randint(0, 20, (b, h), generator=gen)
    out = assign_tiers(scores, high, low)
    masks = [out.high.to_mask(), out.low.to_mask(), out.evicted.to_mask()]
    assert (sum(m.long() for m in masks) == 1).all()  # each token in exactly one tier
    assert out.high.lengths.equal(high) and out.low.lengths.equal(low)
    assert out.kept().lengths.equal(high + low)
    for bi in range(b):
        for hi in range(h):
            s = scores[bi, hi]
            tiers = [s[m[bi, hi]] for m in masks]
            for better, worse in zip(tiers, tiers[1:]):
                if better.numel() and worse.numel():
                    assert better.min() > worse.max()


@pytest.mark.parametrize("seed", SEEDS)
def test_h2o_decoding_keeps_the_budget_at_every_step(seed):
    gen = torch.Generator().manual_seed(seed)
    budget, recent = 12, 6
    scorer = H2OScorer(recent=recent)
    keys = torch.randn(2, 2, 20, 8, generator=gen)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    totals = scorer.accumulate(keys, torch.randn(2, 4, 20, 8, generator=gen), mask)
    index = select_tokens(scorer.protect(totals, mask), budget)
    keys, totals, mask = index.gather_dense(keys), index.gather_dense(totals), mask.gather(1, index.dense()[:, 0])
    for _step in range(8):
        keys = torch.cat([keys, torch.randn(2, 2, 1, 8, generator=gen)], dim=2)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        totals = scorer.accumulate(keys, torch.randn(2, 4, 1, 8, generator=gen), mask, previous=totals)
        scores = scorer.protect(totals, mask)
        index = select_tokens(scores, budget)
        held = index.to_mask()
        assert held[..., -recent:].all()  # the recent half is never evicted
        assert (index.lengths == budget).all()
        # the evicted token is the lowest running total outside the recent window
        dropped = (~held).nonzero()
        assert dropped.shape[0] == 2 * 2
        for b, h, j in dropped.tolist():
            assert scores[b, h, j] == scores[b, h, :-recent].min()
        keys, totals = index.gather_dense(keys), index.gather_dense(totals)
        # kept padding (if any) is the same count at the front of every head: one 2-D mask fits all
        mask = mask.gather(1, index.dense()[:, 0])
        assert keys.shape[2] == budget and not torch.isposinf(totals).any()


def test_h2o_prefill_reads_the_prompt_attention_lse_when_the_fused_op_gives_it(monkeypatch):
    """Where the prompt's fused attention returns its log-sum-exp (CUDA), the h2o layer hands
    it to the totals (one pass instead of two) and keeps the same tokens as without it; a
    CPU stand-in for the fused op plays that part here."""
    import torch.nn.functional as F
    from tiny_models import tiny_model

    import zipkv
    from zipkv.cache import eviction_layer
    from zipkv.eviction_cache import make_eviction_cache
    from zipkv.policies import continuous

    def fused(query, key, value, scaling):
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        s = (query.float() @ k.float().transpose(-1, -2)) * scaling
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        return F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling), s.logsumexp(-1)

    seen = []
    real_mass = continuous.prefill_attention_mass

    def spy(query, keys, real, scaling, **kw):
        seen.append(kw.get("lse"))
        return real_mass(query, keys, real, scaling, **kw)

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(int(
        torch.randint(0, 2**31 - 1, ()))))
    monkeypatch.setattr(continuous, "prefill_attention_mass", spy)

    def run():  # the prompt, then one token over what the prompt's eviction kept
        cache = make_eviction_cache("h2o", model.config, budget=10)
        with torch.no_grad():
            model(input_ids=ids, **zipkv.cache_kwargs(cache))
            logits = model(input_ids=ids[:, :1], **zipkv.cache_kwargs(cache)).logits
        return logits, cache.stats().to_dict()

    plain_logits, plain_held = run()
    assert seen and all(lse is None for lse in seen)
    seen.clear()
    monkeypatch.setattr(eviction_layer, "causal_attention_lse", fused)
    logits, held = run()
    assert len(seen) == model.config.num_hidden_layers
    assert all(lse is not None and lse.shape == (2, model.config.num_attention_heads, 24) for lse in seen)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    assert held == plain_held
    model.set_attn_implementation("sdpa")
