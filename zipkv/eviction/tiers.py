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

from dataclasses import dataclass

import torch
from torch import Tensor

from .select import per_head_counts, rank_tokens
from .token_index import TokenIndex

EVICTED, LOW, HIGH = 0, 1, 2


@dataclass(frozen=True)
class TierAssignment:
    tier_map: Tensor  # int8 [B, H, T]: HIGH / LOW / EVICTED per token
    high: TokenIndex
    low: TokenIndex
    evicted: TokenIndex

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
    n_high = per_head_counts(high, b, h, scores.device, name="high")
    if isinstance(low, str):
        if low != "rest":
            raise ValueError(f"low={low!r}: give a token count or 'rest'")
        n_low = t - n_high
    else:
        n_low = per_head_counts(low, b, h, scores.device, name="low")
    n_kept = n_high + n_low
    if bool((n_kept > t).any()):
        raise ValueError(
            f"high + low = {int(n_kept.max())} tokens is larger than the prompt ({t} tokens); "
            f"allowed range [0, {t}]"
        )
    ranks = rank_tokens(scores)
    tier_map = torch.full((b, h, t), EVICTED, dtype=torch.int8, device=scores.device)
    tier_map[ranks < n_kept[..., None]] = LOW
    tier_map[ranks < n_high[..., None]] = HIGH
    if drop_padding:
        tier_map[torch.isneginf(scores)] = EVICTED
    return TierAssignment(
        tier_map,
        TokenIndex.from_mask(tier_map == HIGH),
        TokenIndex.from_mask(tier_map == LOW),
        TokenIndex.from_mask(tier_map == EVICTED),
    )
