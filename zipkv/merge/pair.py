"""MiniCache's merge of two adjacent layers' states, and the way back.

Per token and KV head, layers a and b (keys, or values, after RoPE) share ONE direction,
SLERP(e_a, e_b, t); each layer keeps its own norm, so layer a comes back as |x_a| * e and
layer b as |x_b| * e. The tokens whose directions differ most between the two layers (the
largest angles, top `retain_ratio` of each row and head) are not merged: both layers keep
them exactly. Tensors are [B, H, N, D]; merged and retained tokens each stay in logical
(ascending position) order, so a restore puts every token back where it was, which keeps
the attention mask's padding columns and causal order right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .slerp import angular_distance, slerp, unit_directions


@dataclass
class MergedStates:
    """Two layers' states of the same N tokens, merged. M = N - k merged tokens, k retained."""

    direction: torch.Tensor  # [B, H, M, D] float32, unit (0 where both layers are 0)
    norm_a: torch.Tensor  # [B, H, M] float32
    norm_b: torch.Tensor
    retained_index: torch.Tensor  # int64 [B, H, k], ascending positions in [0, N)
    retained_a: torch.Tensor  # [B, H, k, D], layer a's original states, input dtype
    retained_b: torch.Tensor
    num_tokens: int


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (got {value!r})")
    return float(value)


def retained_count(num_tokens: int, retain_ratio: float) -> int:
    """Tokens kept unmerged per (row, head): retain_ratio of them, rounded half up."""
    return min(num_tokens, math.floor(retain_ratio * num_tokens + 0.5))


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D], index [B, H, n] -> [B, H, n, D]."""
    return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def _complement(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Ascending positions of [0, num_tokens) not in index [B, H, k] (same k everywhere)."""
    taken = torch.zeros(*index.shape[:2], num_tokens, dtype=torch.bool, device=index.device)
    taken.scatter_(2, index, True)
    position = torch.arange(num_tokens, device=index.device).expand_as(taken)
    return torch.where(taken, position + num_tokens, position).sort(dim=2).values[..., : num_tokens - index.shape[2]]


def merge_states(x_a: torch.Tensor, x_b: torch.Tensor, t: float = 0.6, retain_ratio: float = 0.05) -> MergedStates:
    """Merge layer a's and layer b's states [B, H, N, D] of the same tokens."""
    t = check_fraction("t", t)
    retain_ratio = check_fraction("retain_ratio", retain_ratio)
    if x_a.shape != x_b.shape or x_a.dim() != 4:
        raise ValueError(
            f"states to merge must both be [B, H, N, D] of one shape (got {tuple(x_a.shape)} and {tuple(x_b.shape)})"
        )
    n = x_a.shape[2]
    e_a, norm_a = unit_directions(x_a)
    e_b, norm_b = unit_directions(x_b)
    # A zero vector has no direction; whatever direction it is given restores to 0, so it
    # takes the other layer's and that token merges losslessly (angle 0, never retained).
    zero_a, zero_b = (norm_a == 0).unsqueeze(-1), (norm_b == 0).unsqueeze(-1)
    e_a, e_b = torch.where(zero_a, e_b, e_a), torch.where(zero_b, e_a, e_b)
    theta = angular_distance(e_a, e_b)
    theta = torch.where((zero_a | zero_b).squeeze(-1), torch.zeros_like(theta), theta)
    k = retained_count(n, retain_ratio)
    # topk on the angle; ties (identical layers) are broken arbitrarily, which is harmless
    retained = theta.topk(k, dim=2).indices.sort(dim=2).values
    merged = _complement(retained, n)
    shared = slerp(_gather(e_a, merged), _gather(e_b, merged), t, theta.gather(2, merged))
    return MergedStates(
        direction=shared,
        norm_a=norm_a.gather(2, merged),
        norm_b=norm_b.gather(2, merged),
        retained_index=retained,
        retained_a=_gather(x_a, retained),
        retained_b=_gather(x_b, retained),
        num_tokens=n,
    )


def restore_states(
    direction: torch.Tensor, norm: torch.Tensor, retained_index: torch.Tensor, retained: torch.Tensor,
    num_tokens: int, dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One layer's states [B, H, N, D] in `dtype`: norm * direction at the merged positions,
    the retained states exactly at theirs. Inputs may be in any (storage) dtype."""
    dtype = dtype or retained.dtype
    b, h, k, d = retained.shape
    out = torch.empty(b, h, num_tokens, d, dtype=dtype, device=retained.device)
    keep = torch.zeros(b, h, num_tokens, dtype=torch.bool, device=retained.device)
    keep.scatter_(2, retained_index.long(), True)
    # Boolean-mask assignment fills positions in row-major order: per (row, head), ascending,
    # which is the order the merged and the retained tokens are held in.
    out[~keep] = (direction.float() * norm.float().unsqueeze(-1)).to(dtype).reshape(-1, d)
    out[keep] = retained.to(dtype).reshape(-1, d)
    return out
