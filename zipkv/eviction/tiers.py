"""Tier policy: scores + budgets -> each token high-bit, low-bit or evicted.

The best `high` tokens of each (b, h) go to the high tier, the next `low` to the low
tier, the rest are evicted. Presets name the published layouts:
- zipvl_v1: important tokens high-bit, all the rest low-bit (ZipVL v1, ZipCache);
- mikv:     the same layout, as MiKV ("evicted" tokens kept at low precision);
- zipvl_v2: important tokens kept, the rest evicted (ZipVL v2; plain eviction);
- three_tier: high + low budgets, the rest evicted.
Bit widths are the cache's business; this module only says which token goes where.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from .select import NAN_SCORES, per_head_counts, rank_tokens
from .token_index import TokenIndex

EVICTED, LOW, HIGH = 0, 1, 2


class TierAssignment:
    """tier_map int8 [B, H, T]: HIGH / LOW / EVICTED per token; the per-tier TokenIndex
    built when first read (each is a nonzero, a device read that stalls a GPU's queue, and
    a cache that appends from the tier map itself needs none of them)."""

    def __init__(self, tier_map: Tensor):
        self.tier_map = tier_map

    @cached_property
    def high(self) -> TokenIndex:
        return TokenIndex.from_mask(self.tier_map == HIGH)

    @cached_property
    def low(self) -> TokenIndex:
        return TokenIndex.from_mask(self.tier_map == LOW)

    @cached_property
    def evicted(self) -> TokenIndex:
        return TokenIndex.from_mask(self.tier_map == EVICTED)

    def kept(self) -> TokenIndex:
        """High and low tokens together, in logical order."""
        return TokenIndex.from_mask(self.tier_map != EVICTED)


def assign_tiers(scores: Tensor, high, low=0, *, drop_padding: bool = False) -> TierAssignment:
    """Tiers for scores [B, H, T] (higher = keep, padding -inf).

    high: tokens in the high tier per (b, h): int, [B] or [B, H].
    low: same, or "rest" (every token not high). high + low <= T.
    drop_padding: padding (-inf) is always evicted (rows then differ: ragged layout);
    otherwise padding only fills budgets that the real tokens cannot, so the layout of a
    uniform budget stays rectangular and padding is never kept over a real token.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H, T], got shape {tuple(scores.shape)}")
    b, h, t = scores.shape
    n_high = per_head_counts(high, b, h, scores.device, name="high", checked=True)
    if isinstance(low, str):
        if low != "rest":
            raise ValueError(f"low={low!r}: give a token count or 'rest'")
        n_low = (t - n_high).clamp_min(0)  # high > T is then caught as high + low > T
    else:
        n_low = per_head_counts(low, b, h, scores.device, name="low", checked=True)
    n_kept = n_high + n_low
    # every check in one device read
    nan, high_negative, low_negative, too_many = torch.stack(
        [torch.isnan(scores).any(), (n_high < 0).any(), (n_low < 0).any(), (n_kept > t).any()]).tolist()
    if nan:
        raise ValueError(NAN_SCORES)
    for name, negative, counts in (("high", high_negative, n_high), ("low", low_negative, n_low)):
        if negative:
            raise ValueError(f"{name} must be >= 0, got minimum {int(counts.min())}")
    if too_many:
        raise ValueError(
            f"high + low = {int(n_kept.max())} tokens is larger than the prompt ({t} tokens); "
            f"allowed range [0, {t}]"
        )
    ranks = rank_tokens(scores, checked=True)
    tier_map = torch.full((b, h, t), EVICTED, dtype=torch.int8, device=scores.device)
    tier_map[ranks < n_kept[..., None]] = LOW
    tier_map[ranks < n_high[..., None]] = HIGH
    if drop_padding:
        tier_map[torch.isneginf(scores)] = EVICTED
    return TierAssignment(tier_map)
