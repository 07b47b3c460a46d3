"""H2O, heavy-hitter oracle (Zhang et al. 2023, arXiv 2306.14048): running score
s_j = sum over every query so far of A_ij; keep the heavy hitters + a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import check_int
from .base import (AttentionScorer, WindowAttention, check_keys, group_reduce, key_validity, mask_padding,
                   protect, window_attention)


@dataclass
class H2OScorer(AttentionScorer):
    """recent: the most recent tokens always kept (H2O splits the budget evenly, so the
    cache sets recent = budget // 2). query_chunk bounds the prefill's T x T memory.

    Two kinds of score: `accumulate()` gives the raw running totals (the state a cache
    keeps and updates while decoding); `protect()` turns totals into selection scores.
    `score()` = protect(accumulate()) for a prefill.
    """

    recent: int = 0
    query_chunk: int = 1024

    def __post_init__(self) -> None:
        check_int("recent", self.recent, 0)
        check_int("query_chunk", self.query_chunk, 1)

    def score(self, keys: Tensor, queries: Tensor | None = None, attention_mask: Tensor | None = None,
              *, query_positions: Tensor | None = None, scaling: float | None = None) -> Tensor:
        if queries is None:
            raise ValueError("H2OScorer needs the queries (attention weights) to score tokens")
        totals = self.accumulate(keys, queries, attention_mask, query_positions=query_positions, scaling=scaling)
        return self.protect(totals, attention_mask)

    def score_attention(self, att: WindowAttention) -> Tensor:
        return protect(mask_padding(_column_sums(att), att.key_valid), att.key_valid, last=self.recent)

    def accumulate(self, keys: Tensor, queries: Tensor, attention_mask: Tensor | None = None, *,
                   previous: Tensor | None = None, query_positions: Tensor | None = None,
                   scaling: float | None = None, raw_previous: bool = False) -> Tensor:
        """Running totals [B, Hkv, T] (padding -inf, nothing protected). raw_previous: the caller
        knows `previous` holds raw totals (no +inf: a policy's own stored totals), so the check,
        a device read, is skipped.

        previous: the totals of the first T - Tq tokens (decoding: the cache's state,
        gathered to the kept tokens); the Tq new queries sit at the last positions and
        their attention is added on top. Kept tokens must be in logical order.
        """
        b, hkv, t, _ = check_keys(keys)
        tq = queries.shape[2]
        totals = torch.zeros(b, hkv, t, dtype=torch.float32, device=keys.device)
        if previous is not None:
            if previous.dim() != 3 or tuple(previous.shape[:2]) != (b, hkv) or previous.shape[2] + tq != t:
                raise ValueError(
                    f"previous totals must be [B={b}, Hkv={hkv}, T - Tq={t - tq}], got {tuple(previous.shape)}"
                )
            if not raw_previous and bool(torch.isposinf(previous).any()):
                raise ValueError("previous must be raw totals from accumulate(), not protected (+inf) scores")
            # finite part only: padding is re-marked from the mask below
            totals += F.pad(torch.nan_to_num(previous.to(torch.float32), neginf=0.0), (0, tq))
        positions = query_positions
        if positions is None:
            positions = torch.arange(t - tq, t, device=keys.device)
        for start in range(0, tq, self.query_chunk):
            stop = min(start + self.query_chunk, tq)
            chunk_pos = positions[..., start:stop]
            att = window_attention(queries[:, :, start:stop], keys, attention_mask, chunk_pos, scaling)
            totals += _column_sums(att)
        return mask_padding(totals, key_validity(attention_mask, b, t, keys.device))

    def protect(self, totals: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Selection scores from running totals: the `recent` last tokens +inf."""
        b, _, t = totals.shape
        valid = key_validity(attention_mask, b, t, totals.device)
        return protect(mask_padding(totals, valid), valid, last=self.recent)


def _column_sums(att: WindowAttention) -> Tensor:
    """sum_i A_ij over the (real) queries, GQA heads averaged: [B, Hkv, T]."""
    return group_reduce(att.probs.sum(dim=-2), "mean")
