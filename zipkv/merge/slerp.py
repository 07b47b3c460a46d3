"""Geometry of MiniCache's merge: unit directions, the angle between them, SLERP.

Everything is computed in float32 over the last axis (the head dimension), whatever the
input dtype.
"""

from __future__ import annotations

import torch

# Below this sine of the angle SLERP's weights sin((1-t)θ)/sin θ, sin(tθ)/sin θ divide by
# (almost) zero: near-parallel vectors (and antiparallel ones) use the normalized lerp
# instead, which agrees with SLERP to O(θ^3) for small angles.
_MIN_SINE = 1e-4


def unit_directions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / |x|, |x|) in float32 over the last axis; a zero vector has direction 0, norm 0."""
    xf = x.float()
    norm = xf.norm(dim=-1)
    direction = xf / torch.where(norm > 0, norm, torch.ones_like(norm)).unsqueeze(-1)
    return direction, norm


def angular_distance(e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
    """Angle in radians, in [0, pi], between unit vectors e_a, e_b (last axis reduced).

    2 * atan2(|e_a - e_b|, |e_a + e_b|) instead of acos(e_a . e_b): acos loses every digit
    near parallel vectors (float32 cos of 1e-4 rad is exactly 1), which are the common case
    between adjacent layers. A zero vector gives angle 0 against itself and pi/2 otherwise.
    """
    e_a, e_b = e_a.float(), e_b.float()
    return 2 * torch.atan2((e_a - e_b).norm(dim=-1), (e_a + e_b).norm(dim=-1))


def slerp(e_a: torch.Tensor, e_b: torch.Tensor, t: float, theta: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation of unit vectors: t = 0 gives e_a, t = 1 gives e_b.

    sin((1-t)θ)/sin θ * e_a + sin(tθ)/sin θ * e_b, renormalized (which only removes
    rounding); where sin θ is tiny, normalize((1-t) e_a + t e_b). The result is a unit vector,
    or 0 where the lerp itself is 0 (zero inputs, or exactly opposite ones at t = 0.5).
    """
    e_a, e_b = e_a.float(), e_b.float()
    theta = angular_distance(e_a, e_b) if theta is None else theta.float()
    sine = theta.sin()
    degenerate = sine < _MIN_SINE
    safe = torch.where(degenerate, torch.ones_like(sine), sine)
    w_a = torch.where(degenerate, torch.full_like(sine, 1.0 - t), ((1.0 - t) * theta).sin() / safe)
    w_b = torch.where(degenerate, torch.full_like(sine, float(t)), (t * theta).sin() / safe)
    mixed = w_a.unsqueeze(-1) * e_a + w_b.unsqueeze(-1) * e_b
    length = mixed.norm(dim=-1, keepdim=True)
    return mixed / torch.where(length > 0, length, torch.ones_like(length))
