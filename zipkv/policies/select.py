"""SelectPolicy: prefill-only eviction with fp16 kept tokens (SnapKV, PyramidKV, AdaKV,
DefensiveKV, key-norm; CAKE's cascade is its subclass in cake.py).

After a layer's first forward the scorer rates the prompt's tokens, the budget rule says how
many each row (or head) of this layer keeps, and the best ones are kept in fp16; tokens that
come later are appended, never evicted.

A budget rule is one line of BUDGET_RULES: its name -> a function of zipkv/eviction/budgets/
with the signature `counts(scores [B, H, T], budgets int64 [B], real bool [B, T], *, layer,
num_layers, window, **rule parameters) -> int64 [B] or [B, H]`. `build_select` hands the
rule those of the method's settings its signature names (beta, alpha, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cache.eviction_store import Fp16Store
from ..eviction import select_mask
from ..eviction.budgets.adakv import adakv_layer_counts
from ..eviction.budgets.pyramid import pyramid_layer_counts
from ..eviction.budgets.uniform import uniform_layer_counts
from ..parallel.reduce import rule_counts
from ..parallel.shard import head_shard_of
from .base import Policy, scorer_of, taken_by

BUDGET_RULES = {
    "uniform": uniform_layer_counts,  # the same budget in every layer
    "pyramid": pyramid_layer_counts,  # PyramidKV's staircase over layers
    "adakv": adakv_layer_counts,      # AdaKV's head-wise budgets (ragged storage)
}
# what the policy itself passes every rule; the rest of a rule's keywords are its settings
RULE_CONTEXT = ("layer", "num_layers", "window")


@dataclass
class SelectPolicy(Policy):
    """Prefill-only eviction: `scorer` rates the prompt, `rule` (a BUDGET_RULES name) sizes
    each layer / head, `rule_params` are the rule's settings (pyramid: beta; adakv: alpha);
    window: the scorer's observation window (always kept when the scorer uses one)."""

    scorer: object = None
    rule: str = "uniform"
    window: int = 32
    rule_params: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check_budget_args()
        self.check_rule()
        self.needs_queries = bool(getattr(self.scorer, "needs_queries", True))

    def check_rule(self) -> None:
        if self.rule not in BUDGET_RULES:
            raise ValueError(f"rule={self.rule!r} is not one of {sorted(BUDGET_RULES)}")

    @property
    def protected(self) -> int:
        return self.window if getattr(self.scorer, "uses_window", False) else 0

    def on_prefill(self, layer, query, scaling):
        keys, values, real = layer.recent_keys, layer.recent_values, layer.recent_real
        budgets = self.row_budgets(real, unpadded=layer.recent_unpadded)
        scores = self.scorer.score(keys, query, real, scaling=scaling)
        # under tensor parallelism a head-wise rule (adakv) sees every rank's heads (parallel/reduce.py)
        counts = rule_counts(head_shard_of(layer), BUDGET_RULES[self.rule], scores, budgets, real,
                             layer=layer.eviction_position, num_layers=len(self.layers), window=self.protected,
                             **self.rule_params)
        keep = select_mask(scores, counts.to(scores.device), drop_padding=True)
        layer.replace_all([Fp16Store.select(keys, values, keep)])


def rule_params_of(rule: str, params: dict) -> dict:
    """The settings of `params` the budget rule `rule` takes (its keywords beyond RULE_CONTEXT)."""
    if rule not in BUDGET_RULES:
        raise ValueError(f"rule={rule!r} is not one of {sorted(BUDGET_RULES)}")
    return {k: v for k, v in taken_by(BUDGET_RULES[rule], params).items() if k not in RULE_CONTEXT}


def build_select(config, *, rule: str, scorer: str, budget=None, ratio=None, **p) -> SelectPolicy:
    """The registry's builder of prefill-only methods (config is None when only validating)."""
    window = {"window": p["window"]} if "window" in p else {}
    return SelectPolicy(budget=budget, ratio=ratio, scorer=scorer_of(scorer, p), rule=rule,
                        rule_params=rule_params_of(rule, p), **window)


__all__ = ["BUDGET_RULES", "SelectPolicy", "build_select", "rule_params_of"]
