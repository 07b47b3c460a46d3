"""ZipVL dynamic ratio (He et al. 2024, arXiv 2410.08584): per layer, the number of
important tokens is the smallest set that carries a fraction tau of the probe queries'
attention mass, instead of a fixed ratio."""

from __future__ import annotations

import torch
from torch import Tensor

from ..scorers.base import WindowAttention
from ..validation import check_tau


def zipvl_important_count(attention: WindowAttention | Tensor, tau: float = 0.97, *, checked: bool = False) -> Tensor:
    """int64 [B]: smallest p with sum_{j<=p} a_sorted(j) >= tau * sum_j a_j.

    attention: the probes' WindowAttention (a_j = sum over probes and all query heads
    of A_ij), or the per-token masses a [B, T] directly (e.g. the `accumulated` output
    of zipkv.saliency.attention_scores summed over KV heads; a constant factor does not
    change the count). Padding carries no mass and is
    never counted. tau in (0, 1]; tau = 1 counts every token with non-zero mass.
    Which tokens: the top p by the normalized score (ZipCacheScorer).
    checked: the mass is known finite and >= 0 (a softmax's own sums), so the check's device
    read is skipped.
    """
    tau = check_tau(tau)
    if isinstance(attention, WindowAttention):
        mass = attention.probs.sum(dim=(1, 2, 3))  # [B, T]
    else:
        mass = attention
    if mass.dim() != 2:
        raise ValueError(f"attention mass must be [B, T], got shape {tuple(mass.shape)}")
    if not checked and not bool(((mass >= 0) & torch.isfinite(mass)).all()):  # one device read
        raise ValueError("attention mass must be finite and >= 0")
    # float64 cumsum, and the total taken as its own last element, so tau = 1 stops
    # exactly at the last token with non-zero mass instead of missing it by rounding
    cumulative = mass.to(torch.float64).sort(dim=-1, descending=True).values.cumsum(-1)
    target = tau * cumulative[:, -1:]
    reached = cumulative >= target
    count = reached.to(torch.int64).argmax(dim=-1) + 1
    return torch.where(cumulative[:, -1] > 0, count, torch.zeros_like(count))


def zipvl_important_ratio(attention: WindowAttention | Tensor, tau: float = 0.97) -> Tensor:
    """float32 [B]: the important count divided by the number of real tokens."""
    count = zipvl_important_count(attention, tau)
    if isinstance(attention, WindowAttention):
        real = attention.key_valid.sum(-1)
    else:
        real = torch.full_like(count, attention.shape[-1])
    return count.to(torch.float32) / real.clamp(min=1).to(torch.float32)
