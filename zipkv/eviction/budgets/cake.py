"""CAKE layer budgets (Qin et al., ICLR 2025, arXiv 2503.12491): layers whose window
attention is spread out (entropy) and shifting (variance) get more of the total.

Cascading: budgets are recomputed after each layer's prefill with the layers seen so
far sharing the whole total, so the cache held after any layer never exceeds the total,
and a layer's budget only ever shrinks (it can evict again, never needs tokens back).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..scorers.base import WindowAttention
from ..scorers.cake import window_moments
from ..validation import check_budget, check_int, check_positive


def cake_preference(att: WindowAttention, *, window: int = 32, tau1: float = 1.0, tau2: float = 1.0,
                    head_sum=None) -> Tensor:
    """float64 [B] layer preference P = H^(1/tau1) * V^(1/tau2) from the window rows of A
    over the earlier tokens: H = -sum A log(A + 1e-10) (entropy, all heads and rows),
    V = sum over heads and tokens of the unbiased variance over the window queries.
    tau1, tau2 are tuned per model in the paper (e.g. 1.6 / 0.4 for Llama-3.1-8B at a
    1024 budget); 1.0 / 1.0 is the neutral default. head_sum: applied to H and V before the
    powers when `att` holds only some of the layer's heads (tensor parallel: the sum over the
    other ranks' heads, zipkv.parallel.sum_over_heads)."""
    check_int("window", window, 1)
    tau1, tau2 = check_positive("tau1", tau1), check_positive("tau2", tau2)
    prefix = max(att.seq_len - window, 0)
    probs = att.probs[..., :prefix].to(torch.float64)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=(1, 2, 3, 4))
    _, var = window_moments(att, prefix)
    variance = var.to(torch.float64).sum(dim=(1, 2, 3))
    if head_sum is not None:
        entropy, variance = head_sum(entropy), head_sum(variance)
    return entropy.clamp(min=0) ** (1.0 / tau1) * variance.clamp(min=0) ** (1.0 / tau2)


def cake_allocate(preferences: Tensor, total, cap) -> Tensor:
    """int64 [B, L]: split `total` tokens over layers in proportion to preferences [B, L]
    (or [L]), each capped at `cap` with the excess re-split over the uncapped layers in
    the same proportions (water-filling); floored, so the sum never exceeds the total.
    total, cap: int or [B]. All-zero preferences split evenly."""
    prefs = torch.as_tensor(preferences, dtype=torch.float64)
    if prefs.dim() == 1:
        prefs = prefs[None]
    if prefs.dim() != 2:
        raise ValueError(f"preferences must be [L] or [B, L], got shape {tuple(prefs.shape)}")
    if not bool(torch.isfinite(prefs).all()) or bool((prefs < 0).any()):
        raise ValueError("preferences must be finite and >= 0")
    b, layers = prefs.shape
    totals = torch.as_tensor(total, dtype=torch.float64).expand(b)
    caps = torch.as_tensor(cap, dtype=torch.float64).expand(b)
    if bool((totals < 0).any()) or bool((caps < 0).any()):
        raise ValueError("total and cap must be >= 0")
    out = torch.empty(b, layers, dtype=torch.int64)
    for row in range(b):
        out[row] = _water_fill(prefs[row], float(totals[row]), float(caps[row]))
    return out


def _water_fill(prefs: Tensor, total: float, cap: float) -> Tensor:
    layers = prefs.shape[0]
    if total >= cap * layers:
        return torch.full((layers,), math.floor(cap), dtype=torch.int64)
    if float(prefs.sum()) == 0.0:
        prefs = torch.ones_like(prefs)
    # the split is scale-free; without this, subnormal preferences overflow left / weight to
    # inf and every layer is capped: the budgets then sum past the total
    prefs = prefs / prefs.max()
    share = torch.zeros_like(prefs)
    capped = torch.zeros(layers, dtype=torch.bool)
    while True:  # at most L rounds: each round caps at least one more layer or stops
        free = ~capped
        left = total - cap * int(capped.sum())
        weight = float(prefs[free].sum())
        share = torch.where(capped, torch.full_like(prefs, cap),
                            prefs * (left / weight if weight > 0 else 0.0))
        over = free & (share > cap)
        if not bool(over.any()):
            break
        capped |= over
    return (share + 1e-9).floor().clamp(max=math.floor(cap)).to(torch.int64)


class CakeCascade:
    """Budgets during a layer-by-layer prefill.

    Call add_layer(preference) after each layer's window attention; it returns the
    budgets (window included) of every layer so far, [B, layers so far]: evict each of
    those layers down to its budget before the next layer runs.
    budget: average tokens per layer (window included), as for the uniform baseline;
    the total is num_layers * (budget - window) earlier tokens, each layer capped at
    prompt_len - window. prompt_len may be [B] (real lengths of left-padded rows).
    """

    def __init__(self, num_layers: int, budget: int, prompt_len, *, window: int = 32) -> None:
        check_int("num_layers", num_layers, 1)
        lengths = torch.as_tensor(prompt_len, dtype=torch.int64).reshape(-1)
        for length in lengths.tolist():
            check_budget(budget, length, window=window)
        self.num_layers = num_layers
        self.window = window
        self.total = num_layers * (budget - window)
        self.cap = lengths - window
        self._preferences: list[Tensor] = []
        self._budgets: Tensor | None = None

    def add_layer(self, preference) -> Tensor:
        if len(self._preferences) == self.num_layers:
            raise ValueError(f"all {self.num_layers} layers were already added")
        # host-side bookkeeping (a few numbers per layer): preferences computed on the GPU come here
        self._preferences.append(torch.as_tensor(preference).detach().to("cpu", torch.float64).reshape(-1))
        prefs = torch.stack(torch.broadcast_tensors(*self._preferences), dim=-1)  # [B or 1, l]
        prefs = prefs.expand(max(prefs.shape[0], self.cap.shape[0]), -1)
        budgets = cake_allocate(prefs, self.total, self.cap) + self.window
        if self._budgets is not None:
            # never grow an already evicted layer (floating rounding could add a token)
            previous = self._budgets.expand(budgets.shape[0], -1)
            budgets[:, :-1] = torch.minimum(budgets[:, :-1], previous)
        self._budgets = budgets
        return budgets

    @property
    def budgets(self) -> Tensor:
        if self._budgets is None:
            raise ValueError("no layer added yet")
        return self._budgets
