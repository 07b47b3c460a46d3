"""Shared machinery of the scorers: window attention, padding, pooling, protection.

Shapes: keys [B, Hkv, T, D], queries [B, Hq, Tq, D] with Hq = G * Hkv (query head h
reads KV head h // G, as transformers' repeat_kv), attention_mask [B, T] (1 = real
token, 0 = left padding; the 2-D mask transformers gets from the tokenizer).
Output of every scorer: float32 [B, Hkv, T], higher = keep, padding -inf, tokens the
method always keeps +inf.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")
POS_INF = float("inf")


def key_validity(attention_mask: Tensor | None, batch_size: int, seq_len: int, device) -> Tensor:
    """bool [B, T]: True for real tokens."""
    if attention_mask is None:
        return torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, seq_len):
        raise ValueError(
            f"attention_mask must be the 2-D padding mask [B={batch_size}, T={seq_len}], "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device=device) != 0


def query_positions_for(num_queries: int, seq_len: int, batch_size: int, positions: Tensor | None,
                        device) -> Tensor:
    """int64 [B, Tq] key-axis positions of the queries; default: the last Tq tokens. Positions
    given on the host are range-checked there, before the copy (no device read)."""
    given = positions is not None
    if not given:
        if num_queries > seq_len:
            raise ValueError(f"{num_queries} queries but only {seq_len} keys: pass query_positions")
        positions = torch.arange(seq_len - num_queries, seq_len, device=device)
    elif not isinstance(positions, Tensor) or positions.device.type == "cpu":
        positions = torch.as_tensor(positions, dtype=torch.int64)
        _check_position_range(positions, seq_len)
        given = False  # checked
    positions = torch.as_tensor(positions, device=device).to(torch.int64)
    if positions.dim() == 1:
        positions = positions[None].expand(batch_size, -1)
    if tuple(positions.shape) != (batch_size, num_queries):
        raise ValueError(f"query_positions must be [Tq={num_queries}] or [B, Tq], got {tuple(positions.shape)}")
    if given:
        _check_position_range(positions, seq_len)
    return positions


def _check_position_range(positions: Tensor, seq_len: int) -> None:
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= seq_len):
        raise ValueError(f"query_positions must lie in [0, {seq_len - 1}]")


def visibility(query_positions: Tensor, key_valid: Tensor, query_valid: Tensor) -> Tensor:
    """bool [B, Tq, T]: the query at position p sees key j iff j <= p and both are real."""
    keys = torch.arange(key_valid.shape[-1], device=key_valid.device)
    causal = keys[None, None, :] <= query_positions[:, :, None]
    return causal & key_valid[:, None, :] & query_valid[:, :, None]


@dataclass(frozen=True)
class WindowAttention:
    """softmax(Q K^T * scaling) of a few queries (window or probes) against all keys."""

    probs: Tensor  # float32 [B, Hkv, G, Tq, T]; rows of padding queries are all zero
    query_valid: Tensor  # bool [B, Tq]
    key_valid: Tensor  # bool [B, T]
    query_positions: Tensor  # int64 [B, Tq]

    @property
    def seq_len(self) -> int:
        return self.probs.shape[-1]

    def visible(self) -> Tensor:
        """bool [B, Tq, T]: query i can see key j (causal, both real)."""
        return visibility(self.query_positions, self.key_valid, self.query_valid)

    def row_weights(self) -> Tensor:
        """float32 [B, 1, 1, Tq, 1]: 1 for real queries, 0 for padding queries."""
        return self.query_valid.to(torch.float32)[:, None, None, :, None]

    def valid_query_count(self) -> Tensor:
        """float32 [B, 1, 1, 1]: number of real queries per row (at least 1)."""
        return self.query_valid.sum(-1).clamp(min=1).to(torch.float32)[:, None, None, None]

    @classmethod
    def from_probs(cls, probs: Tensor, num_kv_heads: int, attention_mask: Tensor | None = None,
                   query_positions: Tensor | None = None) -> "WindowAttention":
        """Wrap attention weights computed elsewhere ([B, Hq, Tq, T], e.g. eager attention or
        the probe softmax of zipkv.saliency) so every scorer's rule can reuse them."""
        if probs.dim() != 4:
            raise ValueError(f"probs must be [B, Hq, Tq, T], got {tuple(probs.shape)}")
        b, hq, tq, t = probs.shape
        groups = gqa_groups(hq, num_kv_heads)
        key_valid = key_validity(attention_mask, b, t, probs.device)
        positions = query_positions_for(tq, t, b, query_positions, probs.device)
        query_valid = key_valid.gather(1, positions)
        probs = probs.to(torch.float32).reshape(b, num_kv_heads, groups, tq, t)
        probs = probs * query_valid.to(torch.float32)[:, None, None, :, None]
        return cls(probs, query_valid, key_valid, positions)


def window_attention(queries: Tensor, keys: Tensor, attention_mask: Tensor | None = None,
                     query_positions: Tensor | None = None, scaling: float | None = None) -> WindowAttention:
    """Causal attention probabilities of `queries` over `keys`, in float32.

    Query i at key-axis position p_i sees key j iff j <= p_i and key j is a real token:
    with the default positions (the last Tq tokens) that is the causal mask inside the
    observation window. A padding query sees nothing and gets an all-zero row.
    """
    b, hkv, t, d = check_keys(keys)
    if queries.dim() != 4 or queries.shape[0] != b or queries.shape[-1] != d:
        raise ValueError(f"queries must be [B={b}, Hq, Tq, D={d}], got {tuple(queries.shape)}")
    hq, tq = queries.shape[1], queries.shape[2]
    groups = gqa_groups(hq, hkv)
    scaling = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    key_valid = key_validity(attention_mask, b, t, keys.device)
    positions = query_positions_for(tq, t, b, query_positions, keys.device)
    query_valid = key_valid.gather(1, positions)

    q = queries.to(torch.float32).reshape(b, hkv, groups, tq, d)
    k = keys.to(torch.float32)[:, :, None]  # [B, Hkv, 1, T, D]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, Hkv, G, Tq, T]
    visible = visibility(positions, key_valid, query_valid)[:, None, None]
    logits = logits.masked_fill(~visible, NEG_INF)
    # a row that sees no key (padding query) would be NaN after softmax: make it zeros
    any_visible = visible.any(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(~any_visible, 0.0), dim=-1) * any_visible
    return WindowAttention(probs, query_valid, key_valid, positions)


def pool_tokens(scores: Tensor, kernel_size: int, mode: str) -> Tensor:
    """1-D pooling over the last axis, stride 1, odd kernel, same length out (SnapKV's
    smoothing, so a kept token brings its neighbours' context). Zero-padded at the ends
    for avg (count_include_pad, as SnapKV), -inf-padded for max."""
    if kernel_size == 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    pad = kernel_size // 2
    if mode == "max":
        out = F.max_pool1d(flat, kernel_size, stride=1, padding=pad)
    else:
        out = F.avg_pool1d(flat, kernel_size, stride=1, padding=pad, count_include_pad=True)
    return out.reshape(shape)


def mask_padding(scores: Tensor, key_valid: Tensor) -> Tensor:
    """-inf at padding tokens of scores [B, H, T]."""
    return scores.masked_fill(~key_valid[:, None, :], NEG_INF)


def protect(scores: Tensor, key_valid: Tensor, *, first: int = 0, last: int = 0) -> Tensor:
    """+inf for the first `first` real tokens (sinks) and the last `last` positions
    (observation / recent window) of scores [B, H, T]; padding stays -inf."""
    t = scores.shape[-1]
    keep = torch.zeros_like(key_valid)
    if first > 0:
        real_rank = key_valid.cumsum(-1) - 1  # position among the real tokens
        keep |= real_rank < first
    if last > 0:
        keep |= torch.arange(t, device=scores.device)[None, :] >= t - last
    keep &= key_valid
    return scores.masked_fill(keep[:, None, :], POS_INF)


class Scorer(ABC):
    """One token-importance rule. score() -> float32 [B, Hkv, T], higher = keep."""

    needs_queries: ClassVar[bool] = True

    @abstractmethod
    def score(self, keys: Tensor, queries: Tensor | None = None, attention_mask: Tensor | None = None,
              *, query_positions: Tensor | None = None, scaling: float | None = None) -> Tensor:
        ...


class AttentionScorer(Scorer):
    """A rule over attention probabilities: score() computes them, score_attention() is
    the method's rule (call it directly when the probabilities already exist)."""

    # observation-window methods read only the last `window` queries at the last positions
    uses_window: ClassVar[bool] = False

    def score(self, keys: Tensor, queries: Tensor | None = None, attention_mask: Tensor | None = None,
              *, query_positions: Tensor | None = None, scaling: float | None = None) -> Tensor:
        if queries is None:
            raise ValueError(f"{type(self).__name__} needs the queries (attention weights) to score tokens")
        if self.uses_window:
            if query_positions is not None:
                raise ValueError(f"{type(self).__name__} reads the last `window` queries; query_positions not allowed")
            queries = queries[:, :, -min(self.window, keys.shape[2]):]
        att = window_attention(queries, keys, attention_mask, query_positions, scaling)
        return self.score_attention(att)

    @abstractmethod
    def score_attention(self, att: WindowAttention) -> Tensor:
        ...


def group_reduce(x: Tensor, mode: str = "mean") -> Tensor:
    """[B, Hkv, G, ...] -> [B, Hkv, ...] over the query heads sharing a KV head."""
    return x.mean(dim=2) if mode == "mean" else x.amax(dim=2)


def gqa_groups(num_query_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_query_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads ({num_query_heads}) must be a multiple of KV heads ({num_kv_heads}) (GQA)"
        )
    return num_query_heads // num_kv_heads


def check_keys(keys: Tensor) -> tuple[int, int, int, int]:
    if keys.dim() != 4:
        raise ValueError(f"keys must be [B, Hkv, T, D], got shape {tuple(keys.shape)}")
    return tuple(keys.shape)  # type: ignore[return-value]
