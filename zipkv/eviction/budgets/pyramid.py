"""PyramidKV (Cai et al. 2024, arXiv 2406.02069): lower layers attend broadly and get
more tokens, upper layers fewer, in a linear staircase with the same average."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..validation import check_budget, check_int, check_positive


def pyramid_budgets(num_layers: int, budget: int, prompt_len: int, *, window: int = 32,
                    beta: float = 20.0) -> list[int]:
    """Per-layer budgets (window included) for an average budget C = `budget` per layer.

    B = C - w, min = B / beta, max = 2B - min; if max exceeds S - w it is clipped there
    and min becomes 2B - max, as the reference code does, so the average stays B;
    B_l = max - l * (max - min) / (L - 1), floored, plus the window w.
    """
    check_int("num_layers", num_layers, 1)
    check_budget(budget, prompt_len, window=window)
    if float(beta) < 1.0:
        raise ValueError(f"beta={beta} is outside the allowed range [1, inf) (beta < 1 inverts the pyramid)")
    check_positive("beta", beta)
    base = budget - window
    low = base / beta
    high = 2 * base - low
    if high > prompt_len - window:
        high = prompt_len - window
        low = 2 * base - high
    if num_layers == 1:
        return [budget]
    step = (high - low) / (num_layers - 1)
    # the tiny epsilon keeps exact integers (e.g. 40.0 computed as 39.9999...) from flooring down
    return [math.floor(high - layer * step + 1e-9) + window for layer in range(num_layers)]


def pyramid_layer_counts(scores: Tensor, budgets: Tensor, real: Tensor, *, layer: int, num_layers: int,
                         window: int, beta: float = 20.0) -> Tensor:
    """SelectPolicy's rule 'pyramid' (the budget-rule contract, policies/select.py): int64 [B],
    this layer's step of each row's staircase, for the row's budget [B] and real length."""
    return torch.tensor([
        pyramid_budgets(num_layers, int(c), int(n), window=window, beta=beta)[layer]
        for c, n in zip(budgets.tolist(), real.sum(1).tolist())
    ], dtype=torch.int64)
