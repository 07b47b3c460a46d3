"""AdaKV (Feng et al. 2024, arXiv 2407.11550): within a layer, heads that concentrate
attention need fewer tokens; hand the layer's budget out by a global top-k over heads,
with a floor so no head starves."""

from __future__ import annotations

import torch
from torch import Tensor

from ..select import rank_tokens
from ..validation import check_budget, check_ratio


def adakv_head_budgets(scores: Tensor, budget: int, *, alpha: float = 0.2) -> Tensor:
    """int64 [B, H] per-head budgets that sum to H * budget in every batch row.

    scores [B, H, T] (e.g. SnapKV's, window +inf); n_i = tokens of head i among the
    row's global top H * budget; B_i = round((1 - alpha) * n_i + alpha * budget), rounded
    by largest remainder so the sum is exact (ties to the lower head index).
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [B, H, T], got shape {tuple(scores.shape)}")
    b, h, t = scores.shape
    check_budget(budget, t)
    alpha = check_ratio("alpha", alpha)
    total = h * budget
    in_top = rank_tokens(scores.reshape(b, h * t)) < total
    n = in_top.reshape(b, h, t).sum(-1).to(torch.float64)
    share = (1.0 - alpha) * n + alpha * budget
    return _largest_remainder(share, total)


def adakv_layer_counts(scores: Tensor, budgets: Tensor, real: Tensor, *, layer: int, num_layers: int,
                       window: int, alpha: float = 0.2) -> Tensor:
    """SelectPolicy's rule 'adakv' (the budget-rule contract, policies/select.py): int64 [B, H],
    each row's head budgets over its real tokens only (left padding is not a candidate)."""
    return torch.stack([
        adakv_head_budgets(scores[b : b + 1, :, real.shape[1] - n :], int(c), alpha=alpha)[0]
        for b, (c, n) in enumerate(zip(budgets.tolist(), real.sum(1).tolist()))
    ])


def _largest_remainder(share: Tensor, total: int) -> Tensor:
    """Integer rounding of rows of `share` (each summing to `total`) that keeps the sum."""
    floor = share.floor()
    short = (total - floor.sum(-1)).round().to(torch.int64)  # tokens still to hand out per row
    remainder = share - floor
    # heads by decreasing remainder, lower head first on ties (stable sort)
    order = torch.sort(remainder, dim=-1, descending=True, stable=True).indices
    bonus = torch.zeros_like(floor)
    ranks = torch.arange(share.shape[-1], device=share.device).expand_as(order)
    bonus.scatter_(-1, order, (ranks < short[:, None]).to(floor.dtype))
    return (floor + bonus).to(torch.int64)
