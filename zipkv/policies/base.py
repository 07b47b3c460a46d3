"""What every eviction policy shares: budgets per sequence, the layers it decides for, the hooks.

A policy is shared by all evicting layers of one cache. The cache binds it to its layers in
order (`bind`); a layer calls `after_forward` after each attention call with the queries of
that forward, and a ZipVL layer with sparse prefill calls `sparse_prefill_plan` before its
prompt's attention. The policy then reads the layer through `PolicyLayer`'s names and hands
back what the layer keeps (`layer.replace_all(stores)`); it never touches storage otherwise.

Policies call the pure functions of `zipkv.eviction` (scorers, budgets, tier assignment);
they never re-implement a scoring or budget rule.

Budgets: `budget` (tokens per layer and sequence) or `ratio` (of each sequence's real prompt
tokens, so sequences of a left-padded batch keep different counts). Padding is always
dropped.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..eviction import SCORERS, make_scorer
from ..eviction.validation import check_budget, check_int, check_ratio

NEG_INF = float("-inf")


class PolicyLayer(Protocol):
    """The names of an `EvictingLayer` (cache/eviction_layer.py) a policy may use.

    recent_keys / recent_values [B, Hkv, r, D], recent_real bool [B, r]: the tokens of this
    forward (tiered policies: every token since the last block split) not yet in a store;
    recent_unpadded: True when recent_real is known on the host to be all True (no padding
    anywhere: a policy may skip reading it);
    held_states: (keys, values) of the stores then the recent tokens, [B, Hkv, N, D];
    held_valid(): bool [B, Hkv, N] which of held_states are real;
    forward_mask: bool [B, 1 or H, q, N] the mask this forward attended with;
    parts: the stores, in attention order; replace_all(stores): keep exactly these stores
    (and empty the recent tokens); eviction_position: the layer's index among the bound
    layers. Tiered policies also keep per-layer state on it (tier_stores,
    recent_score_sum / recent_score_count, prefill_selection); a recorded prefill sets
    `memo` (see `memoized`); prompt_lse: float32 [B, Hq, T] the prompt attention's
    log-sum-exp during the prefill's observe, or None (set only for a policy with
    `wants_prompt_lse`, on CUDA, for an unpadded prompt)."""

    recent_keys: torch.Tensor
    recent_values: torch.Tensor
    recent_real: torch.Tensor
    recent_unpadded: bool
    eviction_position: int
    parts: list
    prompt_lse: torch.Tensor | None

    @property
    def held_states(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    @property
    def forward_mask(self) -> torch.Tensor: ...

    def held_valid(self) -> torch.Tensor: ...

    def replace_all(self, stores: list) -> None: ...


@dataclass
class Policy:
    """Budgets per sequence, the bound layers (held weakly: the layers hold the policy, and a
    cycle would keep the cache alive past its last reference) and the hook dispatch: a
    layer's first forward goes to `on_prefill`, every later one to `on_decode`."""

    budget: int | None = None
    ratio: float | None = None
    needs_queries = True
    tracks_recent = False
    sparse_prefill = False  # only ZipVL (TieredPolicy) has an important set to attend over
    wants_prompt_lse = False  # H2O: the prompt attention's log-sum-exp (layer.prompt_lse) saves a pass
    layer_refs: list = field(default_factory=list, repr=False)  # weakref.ref of each bound layer, in order

    @property
    def protected(self) -> int:
        """Tokens the scorer always keeps: a budget must cover them."""
        return 0

    def check_budget_args(self, required: bool = True) -> None:
        if required and (self.budget is None) == (self.ratio is None):
            raise ValueError("give exactly one of budget (tokens per layer) or ratio (kept fraction in [0, 1])")
        if self.budget is not None and self.ratio is not None:
            raise ValueError("give budget or ratio, not both")
        if self.budget is not None:
            check_int("budget", self.budget, 0)
        if self.ratio is not None:
            self.ratio = check_ratio("ratio", self.ratio)

    def bind(self, layers: list) -> None:
        self.layer_refs = [weakref.ref(layer) for layer in layers]
        for position, layer in enumerate(layers):
            layer.eviction_position = position

    @property
    def layers(self) -> list:
        """The bound layers, in order (the cache that holds them is alive while they are used)."""
        return [ref() for ref in self.layer_refs]

    def row_budgets(self, real: torch.Tensor, unpadded: bool = False) -> torch.Tensor:
        """int64 [B]: tokens each sequence keeps per layer, for a prompt with padding flags
        real [B, T]. A token budget larger than the prompt is an error; a sequence shorter
        than the budget (left-padded batch) keeps all its tokens. unpadded: the caller knows
        every row is real (the layer's recent_unpadded): the budgets are computed and checked
        on the host (no device read)."""
        if unpadded:  # every row real: one budget, computed and checked on a host row
            (budget,) = self.row_budgets(torch.ones(1, real.shape[1], dtype=torch.bool)).tolist()
            return torch.full((real.shape[0],), budget, dtype=torch.int64, device=real.device)
        lengths = real.sum(dim=1).to(torch.int64)
        prompt = real.shape[1]
        window = min(self.protected, prompt)
        if self.budget is not None:
            check_budget(self.budget, prompt, window=window)
            return lengths.clamp(max=self.budget)
        budgets = torch.floor(self.ratio * lengths.to(torch.float64) + 0.5).to(torch.int64)
        short = budgets < lengths.clamp(max=self.protected)
        if bool(short.any()):
            row = int(short.nonzero()[0, 0])
            raise ValueError(
                f"ratio={self.ratio} keeps {int(budgets[row])} of a {int(lengths[row])}-token prompt, fewer than "
                f"the {self.protected} tokens the method always keeps; allowed ratio range "
                f"[{self.protected / max(int(lengths[row]), 1):.4f}, 1]"
            )
        return budgets

    def after_forward(self, layer: PolicyLayer, query: torch.Tensor, scaling: float, first: bool) -> None:
        """Called by the layer after each attention call with that forward's queries
        [B, Hq, q, D] (detached); first: the layer's first forward (the prompt)."""
        if first:
            self.on_prefill(layer, query, scaling)
        else:
            self.on_decode(layer, query, scaling)

    def on_prefill(self, layer: PolicyLayer, query: torch.Tensor, scaling: float) -> None:
        """After the prompt's attention: what the layer keeps of it. Default: everything."""

    def on_decode(self, layer: PolicyLayer, query: torch.Tensor, scaling: float) -> None:
        """After a later forward (decoding, chunked prefill). Default: new tokens are appended."""


def taken_by(function: Callable, params: dict) -> dict:
    """Those of the settings `params` that `function` (or a class's constructor) takes by name:
    a builder hands each part of a policy (scorer, budget rule) only its own settings."""
    takes = inspect.signature(function).parameters
    return {k: v for k, v in params.items() if k in takes}


def scorer_of(name: str, params: dict):
    """The named scorer (zipkv.eviction.SCORERS) with those of the settings `params` that its
    class takes."""
    if name not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)} (got {name!r})")
    return make_scorer(name, **taken_by(SCORERS[name], params))


def memoized(layer, key, compute):
    """compute(), or its value from the recorded prefill the layer is being built from (see
    EvictionCache.prefill_from_states): pure, budget-independent work such as H2O's prefill
    totals is then done once per record, not once per cache built from it."""
    memo = getattr(layer, "memo", None)
    if memo is None:
        return compute()
    key = (key, layer.store_dtype)
    if key not in memo:
        memo[key] = compute()
    return memo[key]


__all__ = ["NEG_INF", "Policy", "PolicyLayer", "memoized", "scorer_of", "taken_by"]
