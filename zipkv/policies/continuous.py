"""ContinuousPolicy: StreamingLLM and H2O, evicted back to the budget after EVERY forward, so
the budget holds at every decoding step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.eviction_store import Fp16Store
from ..eviction import H2OScorer, StreamingLLMScorer, select_mask
from ..eviction.validation import check_int
from ..kernels.prefill_mass import prefill_attention_mass
from .base import Policy, memoized


@dataclass
class ContinuousPolicy(Policy):
    """StreamingLLM (kind='streaming_llm': sinks + recent) or H2O (kind='h2o': running
    attention totals + the budget//2 most recent tokens), re-applied after every forward."""

    kind: str = "h2o"
    num_sinks: int = 4
    query_chunk: int = 512

    def __post_init__(self):
        self.check_budget_args()
        if self.kind not in ("streaming_llm", "h2o"):
            raise ValueError(f"kind={self.kind!r} is not one of 'streaming_llm', 'h2o'")
        self.needs_queries = self.wants_prompt_lse = self.kind == "h2o"
        check_int("num_sinks", self.num_sinks, 0)
        self._h2o = H2OScorer(recent=0, query_chunk=self.query_chunk)
        self._streaming = StreamingLLMScorer(num_sinks=self.num_sinks)

    @property
    def protected(self) -> int:
        return self.num_sinks if self.kind == "streaming_llm" else 0

    def on_prefill(self, layer, query, scaling):
        layer.budget_rows = self.row_budgets(layer.recent_real, unpadded=layer.recent_unpadded)
        self.evict(layer, query, scaling, first=True)

    def on_decode(self, layer, query, scaling):
        self.evict(layer, query, scaling, first=False)

    def evict(self, layer, query, scaling, first: bool) -> None:
        """Keep the layer's budget of its held tokens (stores, then this forward's)."""
        keys, values = layer.held_states
        valid = layer.held_valid()
        valid_row = valid[:, 0]  # the layout is the same for every head (uniform budgets)
        held = valid_row.sum(1)
        counts = torch.minimum(held, layer.budget_rows.to(held.device))
        extras = None
        if self.kind == "h2o":
            if first:
                lse = layer.prompt_lse
                totals = memoized(layer, ("h2o_prefill", self.query_chunk),
                                  lambda: self._prefill_totals(keys, query, valid_row, scaling, lse))
            else:
                # the held layout is [store | this forward's tokens]: the store's running
                # totals are the `previous` of the slots before the new queries
                previous = layer.parts[0].padded_extra("totals") if layer.parts else None
                totals = self._h2o.accumulate(keys, query, valid_row, previous=previous, scaling=scaling,
                                              raw_previous=True)  # the store's own totals
            # H2O splits the budget evenly: the budget//2 most recent tokens are always kept
            after = valid_row.flip(-1).cumsum(-1).flip(-1) - 1  # real tokens after each slot
            recent = after < (layer.budget_rows.to(held.device) // 2)[:, None]
            scores = totals.masked_fill((recent & valid_row)[:, None, :], float("inf"))
            extras = {"totals": totals}
        else:
            scores = self._streaming.score(keys, None, valid_row)
        heads = keys.shape[1]
        keep = select_mask(scores, counts[:, None].expand(-1, heads), drop_padding=True)
        layer.replace_all([Fp16Store.select(keys, values, keep, extras)])

    def _prefill_totals(self, keys, query, real, scaling, lse=None):
        """H2OScorer.accumulate over the whole prompt (kernels/prefill_mass.py: on CUDA
        Triton passes that never hold a score matrix, one when the prompt attention's lse is
        given, two without; else query_chunk queries at a time against only the keys they
        can see)."""
        return prefill_attention_mass(query, keys, real, scaling, query_chunk=self.query_chunk, lse=lse)


def build_continuous(config, *, kind: str, budget=None, ratio=None, **p) -> ContinuousPolicy:
    """The registry's builder of streaming_llm and h2o (config is None when only validating)."""
    return ContinuousPolicy(budget=budget, ratio=ratio, kind=kind, **p)


__all__ = ["ContinuousPolicy", "build_continuous"]
