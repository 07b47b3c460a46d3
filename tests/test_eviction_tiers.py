"""Tier policies, the selection ranking and the TokenIndex layout."""

import pytest
import torch

from zipkv.eviction import (EVICTED, HIGH, LOW, TokenIndex, ZipCacheScorer, assign_tiers, rank_tokens, select_tokens,
                            window_attention, zipvl_important_count)

INF = float("inf")
SCORES = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 6.0, 3.0]]])  # ranking: 4, 0, 2, 5, 3, 1


def test_three_tier_hand_example():
    out = assign_tiers(SCORES, 2, 2)  # three_tier: a high and a low budget, the rest evicted
    assert out.high.dense().tolist() == [[[0, 4]]]
    assert out.low.dense().tolist() == [[[2, 5]]]
    assert out.evicted.dense().tolist() == [[[1, 3]]]
    assert out.tier_map.tolist() == [[[HIGH, EVICTED, LOW, EVICTED, HIGH, LOW]]]
    assert out.kept().dense().tolist() == [[[0, 2, 4, 5]]]


def test_the_layouts_of_the_tiered_methods():
    """zipvl / mikv: everything not high is low-bit; zipvl_v2: everything not high is evicted
    (TieredPolicy's layouts, zipkv/policies/tiered.py)."""
    v1 = assign_tiers(SCORES, 2, "rest")
    assert v1.high.dense().tolist() == [[[0, 4]]] and v1.low.dense().tolist() == [[[1, 2, 3, 5]]]
    assert v1.evicted.total == 0
    v2 = assign_tiers(SCORES, 2, 0)
    assert v2.low.total == 0 and v2.evicted.dense().tolist() == [[[1, 2, 3, 5]]]


def test_budget_errors():
    with pytest.raises(ValueError, match=r"high \+ low = 7 tokens is larger than the prompt \(6 tokens\)"):
        assign_tiers(SCORES, 4, 3)
    with pytest.raises(ValueError, match="budget=7 is larger than the prompt"):
        select_tokens(SCORES, 7)
    with pytest.raises(ValueError, match="high must be >= 0"):
        assign_tiers(SCORES, -1)
    with pytest.raises(ValueError, match="integer token counts"):
        select_tokens(SCORES, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="NaN"):
        select_tokens(torch.tensor([[[1.0, float("nan")]]]), 1)


def test_ties_go_to_the_later_position_and_padding_last():
    scores = torch.tensor([[[-INF, -INF, 1.0, 1.0, 2.0, INF, INF]]])
    ranks = rank_tokens(scores)[0, 0].tolist()
    assert ranks == [6, 5, 4, 3, 2, 1, 0]
    assert select_tokens(scores, 3).dense().tolist() == [[[4, 5, 6]]]


def test_padding_fills_only_what_real_tokens_cannot_and_drop_padding_is_ragged():
    scores = torch.tensor([[[0.1, 0.5, 0.3, 0.2, 0.4]],
                           [[-INF, -INF, -INF, 0.7, 0.6]]])  # row 1: 3 left-padding tokens
    rect = select_tokens(scores, 4)
    assert rect.dense().tolist() == [[[1, 2, 3, 4]], [[1, 2, 3, 4]]]  # padding at the front
    ragged = select_tokens(scores, 4, drop_padding=True)
    assert ragged.lengths.tolist() == [[4], [2]]
    assert ragged.indices.tolist() == [1, 2, 3, 4, 3, 4] and ragged.offsets.tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match="ragged"):
        ragged.dense()
    out = assign_tiers(scores, 2, "rest", drop_padding=True)  # zipvl v1's layout
    assert out.evicted.lengths.tolist() == [[0], [3]]


def test_per_sequence_and_per_head_budgets():
    scores = torch.arange(24.0).reshape(2, 3, 4)  # later = better
    per_row = select_tokens(scores, torch.tensor([1, 3]))
    assert per_row.lengths.tolist() == [[1, 1, 1], [3, 3, 3]]
    per_head = select_tokens(scores, torch.tensor([[0, 1, 2], [4, 3, 2]]))
    assert per_head.lengths.tolist() == [[0, 1, 2], [4, 3, 2]]
    assert per_head.indices.tolist() == [3, 2, 3, 0, 1, 2, 3, 1, 2, 3, 2, 3]
    with pytest.raises(ValueError, match=r"must be an int, a \[B=2\] or a \[B=2, H=3\]"):
        select_tokens(scores, torch.tensor([1, 2, 3]))


def test_token_index_gather_flat_and_dense():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 4)
    mask = torch.rand(2, 3, 5) > 0.5
    index = TokenIndex.from_mask(mask)
    flat = index.gather(x)
    expected = torch.cat([x[b, h][mask[b, h]] for b in range(2) for h in range(3)])
    assert flat.equal(expected)
    assert index.to_mask().equal(mask)
    assert index.gather(x[..., 0]).equal(expected[:, 0])  # also for per-token scores [B, H, T]
    dense = torch.stack([torch.randperm(5)[:2] for _ in range(6)]).reshape(2, 3, 2)
    uniform = TokenIndex.from_dense(dense, 5)
    assert uniform.dense().equal(dense.sort(-1).values)
    assert uniform.gather_dense(x).equal(x.gather(2, uniform.dense()[..., None].expand(-1, -1, -1, 4)))
    assert uniform.gather(x).equal(uniform.gather_dense(x).reshape(-1, 4))
    empty = TokenIndex.from_dense(torch.zeros(2, 3, 0, dtype=torch.long), 5)
    assert empty.total == 0 and empty.offsets.tolist() == [0] * 7 and empty.gather(x).shape == (0, 4)
    with pytest.raises(ValueError, match="tensor to gather"):
        index.gather(torch.randn(2, 3, 6, 4))


def test_zipvl_v1_pipeline_gives_each_sequence_its_own_high_tier():
    # probes -> dynamic count per sequence -> top-count by normalized score high, rest low
    torch.manual_seed(5)
    keys, probes = torch.randn(2, 1, 30, 8), torch.randn(2, 3, 6, 8)
    probes[1] *= 0.0  # uniform attention in row 1: it needs many more tokens to reach tau
    att = window_attention(probes, keys)
    counts = zipvl_important_count(att, 0.9)
    assert counts[1] > counts[0]
    out = assign_tiers(ZipCacheScorer().score_attention(att), counts, "rest")
    assert out.high.lengths[:, 0].tolist() == counts.tolist()
    assert (out.high.lengths + out.low.lengths == 30).all() and out.evicted.total == 0


@pytest.mark.parametrize("seed", range(4))
def test_from_uniform_mask_equals_from_mask(seed):
    g = torch.Generator().manual_seed(seed)
    b, h, t = 2, 3, int(torch.randint(1, 60, (1,), generator=g))
    count = int(torch.randint(0, t + 1, (1,), generator=g))
    order = torch.rand(b, h, t, generator=g).argsort(-1)
    mask = order < count  # exactly `count` True entries per (b, h), at random positions
    fast, reference = TokenIndex.from_uniform_mask(mask, count), TokenIndex.from_mask(mask)
    assert torch.equal(fast.indices, reference.indices) and torch.equal(fast.offsets, reference.offsets)
    assert fast.host_lengths == reference.host_lengths and torch.equal(fast.dense(), reference.dense())


def test_packed_store_refuses_nan_only_in_kept_tokens():
    from zipkv.cache.eviction_store import PackedStore

    keys, values = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    keep = torch.ones(1, 2, 8, dtype=torch.bool)
    keep[:, :, 3] = False
    keys[0, 1, 3, 5] = float("nan")  # an evicted token: never quantized, no error
    store = PackedStore(4, None, None, False, 1, 2)
    store.append(keys, values, keep)
    assert store.lengths.tolist() == [[7, 7]]
    values[0, 0, 6, 0] = float("inf")
    with pytest.raises(ValueError, match="values that contain NaN or inf"):
        PackedStore(4, None, None, False, 1, 2).append(keys, values, keep)
