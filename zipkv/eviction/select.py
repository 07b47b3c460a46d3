"""Turning scores into a deterministic ranking and a kept set.

Score contract (all scorers): higher = keep; padding = -inf; tokens a method always
keeps (observation window, attention sinks, H2O's recent half) = +inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .token_index import TokenIndex

NAN_SCORES = "scores contain NaN; every token needs a comparable score"


def rank_tokens(scores: Tensor, checked: bool = False) -> Tensor:
    """int64 ranks over the last axis, 0 = keep first.

    Ties go to the later position (recency), so the ranking is deterministic and the
    same on every device; -inf (padding) therefore always ranks after every real token.
    checked: the caller has refused NaN scores already.
    """
    if not checked and torch.isnan(scores).any():
        raise ValueError(NAN_SCORES)
    t = scores.shape[-1]
    # stable descending sort of the time-reversed scores: among equal scores the later
    # original position comes first
    order = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
    order = (t - 1) - order
    ranks = torch.empty_like(order)
    positions = torch.arange(t, device=scores.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return ranks


def per_head_counts(budget, batch_size: int, num_heads: int, device=None, name: str = "budget",
                    checked: bool = False) -> Tensor:
    """A budget given as int, [B] (per sequence) or [B, H] (per head) as int64 [B, H];
    checked: the caller checks the counts are >= 0 itself."""
    counts = torch.as_tensor(budget, device=device)
    if counts.is_floating_point() or counts.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token counts, got dtype {counts.dtype}")
    counts = counts.to(torch.int64)
    if counts.dim() == 0:
        counts = counts.expand(batch_size, num_heads)
    elif counts.dim() == 1 and counts.shape[0] == batch_size:
        counts = counts[:, None].expand(batch_size, num_heads)
    elif tuple(counts.shape) != (batch_size, num_heads):
        raise ValueError(
            f"{name} must be an int, a [B={batch_size}] or a [B={batch_size}, H={num_heads}] "
            f"tensor, got shape {tuple(counts.shape)}"
        )
    if not checked and bool((counts < 0).any()):
        raise ValueError(f"{name} must be >= 0, got minimum {int(counts.min())}")
    return counts


def select_tokens(scores: Tensor, budget, *, drop_padding: bool = False) -> TokenIndex:
    """The `budget` best tokens of each (b, h) of scores [B, H, T], in logical order.

    budget: int, [B] or [B, H]. With drop_padding, -inf tokens are never held (the
    budget of a short row then shrinks and the result is ragged).
    """
    return TokenIndex.from_mask(select_mask(scores, budget, drop_padding=drop_padding))


def select_mask(scores: Tensor, budget, *, drop_padding: bool = False) -> Tensor:
    """bool [B, H, T]: select_tokens' choice as a mask (what a store selects from), without
    building the index (a nonzero: one more device read)."""
    b, h, t = _check_scores(scores)
    counts = per_head_counts(budget, b, h, scores.device, checked=True)
    # the three checks in one device read (each read stalls a GPU's queue)
    nan, low, high = torch.stack([torch.isnan(scores).any(), counts.min() < 0, counts.max() > t]).tolist()
    if nan:
        raise ValueError(NAN_SCORES)
    if low:
        raise ValueError(f"budget must be >= 0, got minimum {int(counts.min())}")
    if high:
        raise ValueError(
            f"budget={int(counts.max())} is larger than the prompt ({t} tokens); allowed range [0, {t}]"
        )
    keep = rank_tokens(scores, checked=True) < counts[..., None]
    if drop_padding:
        keep &= ~torch.isneginf(scores)
    return keep


def _check_scores(scores: Tensor) -> tuple[int, int, int]:
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H, T], got shape {tuple(scores.shape)}")
    return tuple(scores.shape)  # type: ignore[return-value]
