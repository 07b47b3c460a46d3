"""The automatic recipe's two pure steps: measure each candidate scheme on a layer's own prompt
(`calibrate`), then choose one per layer under a byte budget (`choose_per_layer`).

A candidate is (key bits, value bits, rotation) on zipkv's storage (channelwise keys, channel-
separable tokenwise values, `PackedTier`). Its cost is the bytes the tier really holds for the
layer's block (codes, scales, minimums, channel factors, group ends; + the rotation's signs);
its error is the relative attention-output error ||o' - o|| / ||o|| of the prompt's last
`window` queries over the layer's keys and values with the block quantized (dequantized, and
un-rotated), against the exact states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..quant.rotation import HadamardRotation
from .tier import PackedTier, finite_flags, refuse_nonfinite


@dataclass(frozen=True)
class Candidate:
    key_bits: int
    value_bits: int
    rotation: str | None = None

    @property
    def label(self) -> str:
        return f"K{self.key_bits}/V{self.value_bits}" + (" rotated" if self.rotation else "")


def candidates(head_dim: int) -> list[Candidate]:
    """Every (key, value) pair of {2, 4, 8} bits, unrotated and (power-of-two head_dim) rotated."""
    rotations = [None] + (["hadamard"] if head_dim & (head_dim - 1) == 0 else [])
    return [Candidate(k, v, r) for r in rotations for k in (2, 4, 8) for v in (2, 4, 8)]


@dataclass(frozen=True)
class Measured:
    candidate: Candidate
    nbytes: int
    error: float


def window_attention(query, keys, values, is_real, scaling):
    """Attention output float32 [B, Hq, w, D] of the last w prompt queries (causal: query t of
    the window sees keys up to its own position) over keys / values [B, H, n, D]; padding
    (is_real False, [B, n]) is never seen."""
    b, hq, w, _ = query.shape
    n, rep = keys.shape[2], hq // keys.shape[1]
    k, v = keys.float().repeat_interleave(rep, 1), values.float().repeat_interleave(rep, 1)
    scores = (query.float() @ k.transpose(-1, -2)) * scaling
    position = n - w + torch.arange(w, device=query.device)
    hidden = torch.arange(n, device=query.device)[None, :] > position[:, None]  # [w, n]
    hidden = hidden[None, None] | ~is_real[:, None, None, :]
    # a row that sees nothing (all padding) gives zeros, not NaN
    probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), -1).nan_to_num(0.0)
    return probs @ v


def calibrate(query, keys, values, is_real, block: int, scaling: float, settings, layer_idx: int,
              options: list[Candidate]) -> list[Measured]:
    """Each candidate's bytes and error on one layer: the first `block` tokens of keys / values
    [B, H, n, D] (padding already overwritten, as the layer quantizes them) quantized, the rest
    exact. query [B, Hq, w, D]: the prompt's last queries. settings: the layer's
    CompressionConfig (groups, channel factors, seed of the rotation). The errors, the norm and
    the states' finiteness come back in one device read at the end (a read per candidate was
    ~40 a layer, each stalling a GPU's queue)."""
    exact = window_attention(query, keys, values, is_real, scaling)
    heads, dim = keys.shape[1], keys.shape[3]
    rotations = {}
    errors, sizes = [], []
    for c in options:
        k, v = keys[:, :, :block], values[:, :, :block]  # as the layer hands them to its tier
        extra = 0
        if c.rotation is not None:
            if c.rotation not in rotations:
                rotations[c.rotation] = HadamardRotation(heads, dim, settings.seed, layer_idx, keys.device, keys.dtype)
            rot = rotations[c.rotation]
            k, v = rot.rotate(k), rot.rotate(v)
            extra = sum(t.numel() * t.element_size() for t in rot.tensors())
        tier = PackedTier(c.key_bits, settings.key_group_size, settings.value_group_size, settings.channel_separable,
                          c.value_bits)
        tier.append(k, v, checked=True)  # NaN / inf: refused below, in the one read
        k_hat, v_hat = tier.dequantize(torch.float32)
        if c.rotation is not None:
            k_hat, v_hat = rot.unrotate(k_hat), rot.unrotate(v_hat)
        k_all = torch.cat([k_hat, keys[:, :, block:].float()], 2)
        v_all = torch.cat([v_hat, values[:, :, block:].float()], 2)
        errors.append((window_attention(query, k_all, v_all, is_real, scaling) - exact).norm())
        sizes.append(tier.nbytes() + extra)
    finite = finite_flags(keys[:, :, :block], values[:, :, :block]).to(torch.float32)
    keys_ok, values_ok, norm, *errors = torch.cat([finite, torch.stack([exact.norm(), *errors])]).tolist()
    refuse_nonfinite(keys_ok, values_ok)
    norm = norm or 1.0
    return [Measured(c, size, error / norm if math.isfinite(error) else float("inf"))
            for c, size, error in zip(options, sizes, errors)]


def pareto(options: list[Measured]) -> list[Measured]:
    """The options no other beats on both bytes and error, by increasing bytes (decreasing error)."""
    front = []
    for m in sorted(options, key=lambda m: (m.nbytes, m.error)):
        if not front or m.error < front[-1].error:
            front.append(m)
    return front


def choose_per_layer(tables: list[list[Measured]], budget: float) -> list[Measured]:
    """One option per layer, total bytes <= budget where possible, least total error: every layer
    starts at its cheapest option, then the upgrade with the largest error drop per added byte
    that still fits is taken, until none fits (greedy on error per byte). If even the cheapest
    options exceed the budget, those are returned."""
    fronts = [pareto(table) for table in tables]
    at = [0] * len(fronts)
    spent = sum(front[0].nbytes for front in fronts)
    while True:
        best = None
        for i, front in enumerate(fronts):
            here = front[at[i]]
            for j in range(at[i] + 1, len(front)):
                step = front[j].nbytes - here.nbytes
                if spent + step > budget:
                    break
                gain = (here.error - front[j].error) / max(step, 1)
                if best is None or gain > best[0]:
                    best = (gain, i, j, step)
        if best is None:
            return [front[k] for front, k in zip(fronts, at)]
        _, i, j, step = best
        at[i], spent = j, spent + step


__all__ = ["Candidate", "Measured", "calibrate", "candidates", "choose_per_layer", "pareto", "window_attention"]
