"""CakePolicy: CAKE (Qin et al. 2025) layer budgets by preference, cascading.

A SelectPolicy whose budgets are not known from one layer alone: after each layer's prefill
the layers seen so far share the whole total (zipkv/eviction/budgets/cake.py CakeCascade),
so this layer keeps its share and the earlier layers shrink to theirs at once; the cache
held after any layer stays within the total. The layers must be fed in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.eviction_store import Fp16Store
from ..eviction import CakeCascade, cake_preference, select_mask, window_attention
from ..parallel.reduce import sum_over_heads
from ..parallel.shard import head_shard_of
from .base import NEG_INF, scorer_of
from .select import SelectPolicy


@dataclass
class CakePolicy(SelectPolicy):
    """rule 'cake': the scorer's window-attention scores (CakeScorer), layer preferences with
    temperatures tau1 (entropy) and tau2 (variance)."""

    rule: str = "cake"
    tau1: float = 1.0
    tau2: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        self._cascades = None  # one CakeCascade per row while a prefill runs through the layers

    def check_rule(self) -> None:
        if self.rule != "cake":
            raise ValueError(f"rule={self.rule!r}: CakePolicy's rule is 'cake'")

    def on_prefill(self, layer, query, scaling):
        keys, values, real = layer.recent_keys, layer.recent_values, layer.recent_real
        budgets = self.row_budgets(real, unpadded=layer.recent_unpadded)
        position = layer.eviction_position
        att = window_attention(query[:, :, -min(self.window, keys.shape[2]):], keys, real, scaling=scaling)
        scores = self.scorer.score_attention(att)
        shard = head_shard_of(layer)  # tensor parallel: entropy and variance over every rank's heads
        preference = cake_preference(att, window=self.window, tau1=self.tau1, tau2=self.tau2,
                                     head_sum=None if shard is None else lambda x: sum_over_heads(shard, x))
        lengths = real.sum(1).tolist()
        if position == 0:
            self._cascades = [CakeCascade(len(self.layers), int(c), int(n), window=self.window)
                              for c, n in zip(budgets.tolist(), lengths)]
        if self._cascades is None:
            raise RuntimeError("CAKE's cascade starts at the first layer; layers were fed out of order")
        allotted = torch.cat([c.add_layer(preference[b : b + 1]) for b, c in enumerate(self._cascades)])  # [B, l]
        keep = select_mask(scores, allotted[:, position].to(scores.device), drop_padding=True)
        layer.replace_all([Fp16Store.select(keys, values, keep, extras={"score": scores})])
        # cascading: the layers before this one shrink to their new (never larger) budgets now,
        # so the cache held after any layer stays within the total
        for earlier in self.layers[:position]:
            shrink(earlier, allotted[:, earlier.eviction_position])
        if position == len(self.layers) - 1:
            for done in self.layers:
                for part in done.parts:
                    part.drop_extras()
            self._cascades = None


def shrink(layer, counts: torch.Tensor) -> None:
    """Evict an already evicted layer down to counts [B] by the scores its store kept."""
    (store,) = layer.parts
    keys, values, valid = store.padded()
    scores = store.padded_extra("score", NEG_INF).masked_fill(~valid, NEG_INF)
    held = valid.sum(-1)
    if bool((held <= counts.to(held.device)[:, None]).all()):
        return
    keep = select_mask(scores, torch.minimum(held, counts.to(held.device)[:, None]), drop_padding=True)
    layer.parts = [Fp16Store.select(keys, values, keep, extras={"score": scores})]


def build_cake(config, *, scorer: str, budget=None, ratio=None, **p) -> CakePolicy:
    """The registry's builder of cake (config is None when only validating)."""
    own = {k: p[k] for k in ("window", "tau1", "tau2") if k in p}
    return CakePolicy(budget=budget, ratio=ratio, scorer=scorer_of(scorer, p), **own)


__all__ = ["CakePolicy", "build_cake", "shrink"]
