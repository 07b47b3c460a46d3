"""Uniform budgets: every layer keeps the same number of tokens."""

from __future__ import annotations

import math

from torch import Tensor

from ..validation import check_budget, check_int, check_ratio


def budget_from_ratio(ratio: float, prompt_len: int) -> int:
    """Tokens kept for a kept fraction `ratio` in [0, 1] of a prompt (rounded half up)."""
    ratio = check_ratio("ratio", ratio)
    check_int("prompt_len", prompt_len, 0)
    return min(prompt_len, math.floor(ratio * prompt_len + 0.5))


def uniform_budgets(num_layers: int, prompt_len: int, *, budget: int | None = None,
                    ratio: float | None = None, window: int = 0) -> list[int]:
    """[budget] * num_layers; give either `budget` (tokens) or `ratio` (kept fraction).
    `window`: tokens the scorer always keeps, so the budget must cover them."""
    check_int("num_layers", num_layers, 1)
    if (budget is None) == (ratio is None):
        raise ValueError("give exactly one of budget (tokens) or ratio (kept fraction in [0, 1])")
    if budget is None:
        budget = budget_from_ratio(ratio, prompt_len)
    check_budget(budget, prompt_len, window=min(window, prompt_len))
    return [budget] * num_layers


def uniform_layer_counts(scores: Tensor, budgets: Tensor, real: Tensor, *, layer: int, num_layers: int,
                         window: int) -> Tensor:
    """SelectPolicy's rule 'uniform' (the budget-rule contract, policies/select.py): every
    layer keeps each row's budget, budgets int64 [B]."""
    return budgets
