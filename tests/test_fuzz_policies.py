"""Fuzzing the eviction selection, the budget rules and the tier assignment (hypothesis, the
fixed-seed "ci" profile of conftest.py), then an EvictionCache end to end on a tiny model.

Over random lengths, budgets, ratios and left-padding patterns: every budget is respected,
no token is both kept and evicted, the kept positions of each (row, head) are in logical
order, and the kept set is a top-k of the scores (no evicted token outranks a kept one).
"""

import math

import torch
from hypothesis import given, settings, strategies as st

from zipkv import cache_kwargs, make_cache
from zipkv.eviction import assign_tiers, select_tokens
from zipkv.eviction.budgets import (
    CakeCascade,
    adakv_head_budgets,
    budget_from_ratio,
    cake_allocate,
    pyramid_budgets,
    uniform_budgets,
    zipvl_important_count,
)
from zipkv.eviction.tiers import EVICTED, HIGH, LOW

from tiny_models import tiny_model


def random_scores(seed: int, b: int, h: int, t: int, pads, protected: int = 0):
    """Scores [B, H, T] under the scorer contract: padding (the first pads[row] tokens) -inf,
    the last `protected` tokens +inf (an observation window); ties are frequent (rounded)."""
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(b, h, t, generator=gen) * 4).round() / 4
    scores[..., t - protected:] = float("inf") if protected else scores[..., t - protected:]
    for row, pad in enumerate(pads):
        scores[row, :, :pad] = float("-inf")
    return scores


def assert_logical_order(index):
    for run in range(index.batch_size * index.num_heads):
        positions = index.indices[index.offsets[run]:index.offsets[run + 1]]
        assert bool((positions[1:] > positions[:-1]).all()), f"run {run} not ascending: {positions.tolist()}"


def assert_top_k(scores, keep):
    """No evicted token scores above a kept one in the same (row, head)."""
    lowest_kept = torch.where(keep, scores, torch.full_like(scores, float("inf"))).amin(-1)
    highest_evicted = torch.where(keep, torch.full_like(scores, float("-inf")), scores).amax(-1)
    assert bool((highest_evicted <= lowest_kept).all())


batch = st.integers(1, 3).flatmap(lambda b: st.tuples(
    st.just(b), st.integers(1, 3), st.integers(1, 64)).flatmap(lambda bht: st.tuples(
        st.just(bht), st.lists(st.integers(0, bht[2]), min_size=bht[0], max_size=bht[0]))))


@given(seed=st.integers(0, 2**31 - 1), shape=batch, budget_kind=st.sampled_from(["int", "row", "head"]),
       drop_padding=st.booleans(), data=st.data())
def test_select_tokens_respects_budget_order_and_ranking(seed, shape, budget_kind, drop_padding, data):
    (b, h, t), pads = shape
    scores = random_scores(seed, b, h, t, pads, protected=data.draw(st.integers(0, 4)) if t > 4 else 0)
    size = {"int": (), "row": (b,), "head": (b, h)}[budget_kind]
    budget = torch.tensor(data.draw(st.lists(st.integers(0, t), min_size=math.prod(size),
                                             max_size=math.prod(size)))).reshape(size)
    index = select_tokens(scores, budget if size else int(budget), drop_padding=drop_padding)
    expected = budget.expand(b, h) if budget_kind != "row" else budget[:, None].expand(b, h)
    real = torch.tensor([t - p for p in pads])[:, None].expand(b, h)
    assert index.lengths.equal(torch.minimum(expected, real) if drop_padding else expected)
    assert_logical_order(index)
    keep = index.to_mask()
    assert int(keep.sum()) == index.total  # every kept position once
    assert_top_k(scores, keep)
    # padding is held only where the budget is larger than the row's real tokens
    padding = torch.isneginf(scores)
    assert not bool(((keep & padding).any(-1) & (~keep & ~padding).any(-1)).any())


@given(seed=st.integers(0, 2**31 - 1), shape=batch, drop_padding=st.booleans(), data=st.data())
def test_assign_tiers_partitions_every_token(seed, shape, drop_padding, data):
    (b, h, t), pads = shape
    scores = random_scores(seed, b, h, t, pads)
    high = data.draw(st.integers(0, t))
    low = data.draw(st.one_of(st.just("rest"), st.integers(0, t - high)))
    tiers = assign_tiers(scores, high, low, drop_padding=drop_padding)
    n_low = t - high if low == "rest" else low
    masks = [tiers.high.to_mask(), tiers.low.to_mask(), tiers.evicted.to_mask()]
    assert bool((sum(m.int() for m in masks) == 1).all())  # one tier per token: none both kept and evicted
    for m, value in zip(masks, (HIGH, LOW, EVICTED)):
        assert m.equal(tiers.tier_map == value)
    for index in (tiers.high, tiers.low, tiers.evicted, tiers.kept()):
        assert_logical_order(index)
    assert tiers.kept().to_mask().equal(masks[0] | masks[1])
    padding = torch.isneginf(scores)
    if drop_padding:
        assert not bool((tiers.kept().to_mask() & padding).any())
        assert bool((tiers.high.lengths <= high).all()) and bool((tiers.kept().lengths <= high + n_low).all())
    else:
        assert bool((tiers.high.lengths == high).all()) and bool((tiers.low.lengths == n_low).all())
    assert_top_k(scores, masks[0] | masks[1])
    assert_top_k(torch.where(masks[0] | masks[1], scores, torch.full_like(scores, float("-inf"))), masks[0])


@given(ratio=st.floats(0, 1), prompt=st.integers(0, 5000), layers=st.integers(1, 40), window=st.integers(0, 64))
def test_uniform_budgets_from_a_ratio(ratio, prompt, layers, window):
    budget = budget_from_ratio(ratio, prompt)
    assert 0 <= budget <= prompt and abs(budget - ratio * prompt) <= 0.5
    if budget >= min(window, prompt):
        assert uniform_budgets(layers, prompt, ratio=ratio, window=window) == [budget] * layers


@given(layers=st.integers(1, 40), prompt=st.integers(1, 4000), beta=st.floats(1, 100), data=st.data())
def test_pyramid_budgets_stay_in_range_and_descend(layers, prompt, beta, data):
    window = data.draw(st.integers(0, prompt))
    budget = data.draw(st.integers(window, prompt))
    out = pyramid_budgets(layers, budget, prompt, window=window, beta=beta)
    assert len(out) == layers and all(window <= x <= prompt for x in out)
    assert all(a >= b for a, b in zip(out, out[1:]))
    assert sum(out) <= layers * budget  # floored: the average never exceeds the budget


@given(seed=st.integers(0, 2**31 - 1), shape=batch, alpha=st.floats(0, 1), data=st.data())
def test_adakv_head_budgets_sum_exactly(seed, shape, alpha, data):
    (b, h, t), pads = shape
    scores = random_scores(seed, b, h, t, pads)
    budget = data.draw(st.integers(0, t))
    out = adakv_head_budgets(scores, budget, alpha=alpha)
    assert out.shape == (b, h) and bool((out >= 0).all()) and bool((out <= t).all())
    assert bool((out.sum(-1) == h * budget).all())


@given(prefs=st.lists(st.floats(0, 1e6), min_size=1, max_size=12), total=st.integers(0, 10_000),
       cap=st.integers(0, 2_000))
def test_cake_allocate_never_exceeds_total_or_cap(prefs, total, cap):
    out = cake_allocate(torch.tensor(prefs, dtype=torch.float64), total, cap)
    assert bool((out >= 0).all()) and bool((out <= cap).all()) and int(out.sum()) <= total


@given(layers=st.integers(1, 8), data=st.data())
def test_cake_cascade_budgets_only_shrink(layers, data):
    prompt = data.draw(st.lists(st.integers(8, 200), min_size=1, max_size=3))
    window = data.draw(st.integers(0, min(prompt)))
    budget = data.draw(st.integers(window, min(prompt)))
    cascade = CakeCascade(layers, budget, prompt, window=window)
    previous = None
    for _ in range(layers):
        out = cascade.add_layer(torch.tensor(data.draw(st.floats(0, 1e3))))
        assert bool(((out - window).sum(-1) <= layers * (budget - window)).all())
        assert bool((out <= torch.tensor(prompt)[:, None]).all())
        if previous is not None:
            assert bool((out[:, :-1] <= previous).all())  # an evicted layer never needs tokens back
        previous = out


@given(seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3), t=st.integers(1, 64), tau=st.floats(0.01, 1),
       zeros=st.integers(0, 8))
def test_zipvl_important_count_is_the_smallest_set_reaching_tau(seed, b, t, tau, zeros):
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(b, t, generator=gen)
    mass[:, :min(zeros, t)] = 0  # padding carries no mass
    count = zipvl_important_count(mass, tau)
    ranked = mass.to(torch.float64).sort(-1, descending=True).values.cumsum(-1)
    for row in range(b):
        n, total = int(count[row]), float(ranked[row, -1])
        assert 0 <= n <= int((mass[row] > 0).sum())
        if total > 0:
            assert float(ranked[row, n - 1]) >= tau * total * (1 - 1e-12)
            assert n == 1 or float(ranked[row, n - 2]) < tau * total


# -- an EvictionCache end to end --------------------------------------------------------------------
MODEL = tiny_model("llama")


def kept_per_row_and_head(layer):
    """int [B, H]: real tokens a layer holds per (row, KV head) (its kept parts + recent tokens)."""
    kept = layer.recent_real.sum(-1, keepdim=True).expand(-1, layer.num_heads).clone()
    for part in layer.parts:
        kept += part.lengths.to(kept.device)
    return kept


@settings(max_examples=6)
@given(length=st.integers(12, 48), pad=st.integers(0, 10), ratio=st.floats(0.3, 1.0),
       method=st.sampled_from(["snapkv", "key_norm", "h2o"]), steps=st.integers(0, 3))
def test_eviction_cache_keeps_exactly_the_budget_per_row(length, pad, ratio, method, steps):
    """Per row, each layer keeps round(ratio * real tokens) prompt tokens (SnapKV / key-norm:
    prefill eviction, then every decoded token kept; H2O: the budget after every forward)."""
    gen = torch.Generator().manual_seed(length * 100 + pad)
    ids = torch.randint(3, 250, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    real = mask.sum(-1)
    budgets = torch.floor(ratio * real.double() + 0.5).long()
    params = dict(ratio=ratio)
    if method == "snapkv":
        params.update(window=4, kernel_size=3)
    cache = make_cache(method, MODEL.config, **params)
    with torch.no_grad():
        out = MODEL(ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        for step in range(steps):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            out = MODEL(out.logits[:, -1:].argmax(-1), attention_mask=mask, **cache_kwargs(cache), use_cache=True)
    # a continuous policy (H2O) evicts back to the budget after every forward; the prefill-only
    # ones keep every decoded token
    expected = budgets if method == "h2o" else budgets + steps
    stats = cache.stats()
    for layer, kept_heads in zip(cache.layers, stats.kept_token_heads_per_layer):
        kept = kept_per_row_and_head(layer)
        assert kept.equal(expected[:, None].expand_as(kept)), (kept.tolist(), expected.tolist())
        assert kept_heads == int(kept.sum())
        assert layer.get_seq_length() == length + steps  # logical positions continue after eviction
