"""Randomized Hadamard rotations per KV head (QuaRot / SpinQuant-style), for rotated K/V codes.

R_h = diag(s_h) H_D / sqrt(D): a +-1 sign vector s_h per (layer, KV head), seeded, then the
Walsh-Hadamard matrix of size D (a power of two), scaled to be orthonormal, so R^-1 = R^T.
Rows are tokens: a stored state is x R (`rotate`), and x R R^T = x (`unrotate`).

Why it is exact for attention: (q R) . (k R) = q . k, and sum_j p_j (v_j R) = o R, so a layer
that holds rotated codes attends with a rotated query and un-rotates the output (o R^T) instead
of rotating the cache back. The rotation spreads a few outlier channels over all channels,
which narrows the quantization ranges of channelwise keys and tokenwise values.

`fwht` is the fast transform (log2(D) butterfly steps, O(D log D) per row); `hadamard_matrix`
and `HadamardRotation.matrices` are the explicit references the tests compare it with.
"""

from __future__ import annotations

import math

import torch

ROTATIONS = ("hadamard",)
# Keeps every (layer, head) sign vector distinct for any seed (a layer index is far below it).
_LAYER_STRIDE = 1_000_003


def check_rotation(rotation, name: str = "rotation"):
    if rotation is not None and rotation not in ROTATIONS:
        raise ValueError(f"{name} must be None or one of {ROTATIONS} (got {rotation!r})")
    return rotation


def check_head_dim(head_dim: int) -> int:
    if not isinstance(head_dim, int) or head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"rotation='hadamard' needs a head_dim that is a power of two (got {head_dim!r}); "
                         "use rotation=None for this model")
    return head_dim


def working(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype a transform computes in: float64 stays, everything else float32."""
    return x if x.dtype == torch.float64 else x.float()


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last axis (float32 or float64):
    x H_D / sqrt(D), H_D the Sylvester matrix (symmetric, so the transform is its own inverse)."""
    d = check_head_dim(x.shape[-1])
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        pairs = y.reshape(-1, d // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).reshape(-1, d)
        h *= 2
    return (y * (1.0 / math.sqrt(d))).reshape(*lead, d)


def hadamard_matrix(d: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix H_D / sqrt(D) (the reference of `fwht`)."""
    check_head_dim(d)
    m = torch.ones(1, 1, dtype=dtype)
    while m.shape[0] < d:
        m = torch.cat([torch.cat([m, m], 1), torch.cat([m, -m], 1)], 0)
    return m / math.sqrt(d)


def sign_vectors(num_heads: int, head_dim: int, seed: int, layer_idx: int) -> torch.Tensor:
    """+-1 float32 [num_heads, head_dim], one vector per (layer, KV head), from the seed."""
    g = torch.Generator().manual_seed(int(seed) * _LAYER_STRIDE + int(layer_idx))
    return torch.randint(0, 2, (num_heads, head_dim), generator=g).float() * 2 - 1


class HadamardRotation:
    """R_h = diag(s_h) H / sqrt(D) for each KV head h of one layer (module docstring).

    `signs` [H, D] is the only state (held in `dtype` on `device`: +-1 is exact in any float
    dtype; a layer counts it in its stats). Every transform computes in float32 and returns
    `dtype` (default: the input's)."""

    def __init__(self, num_heads: int, head_dim: int, seed: int, layer_idx: int, device=None,
                 dtype: torch.dtype = torch.float16):
        self.num_heads, self.head_dim = num_heads, check_head_dim(head_dim)
        self.signs = sign_vectors(num_heads, head_dim, seed, layer_idx).to(device=device, dtype=dtype)

    def _per_head_signs(self, heads: int) -> torch.Tensor:
        """[heads, 1, D]: KV head h's signs for its own tensors, or repeated for each of its query
        heads (GQA: query head i reads KV head i // (heads / H))."""
        if heads % self.num_heads:
            raise ValueError(f"{heads} heads are not a multiple of the rotation's {self.num_heads} KV heads")
        return self.signs.float().repeat_interleave(heads // self.num_heads, dim=0)[:, None, :]

    def rotate(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x R per head: x [B, heads, N, D] (keys and values: heads = H; queries: a multiple)."""
        out, x = dtype or x.dtype, working(x)
        return fwht(x * self._per_head_signs(x.shape[1]).to(x.dtype)).to(out)

    def unrotate(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x R^T per head (the inverse of `rotate`): H is symmetric, so x R^T = (x H / sqrt(D)) * s."""
        out, x = dtype or x.dtype, working(x)
        return (fwht(x) * self._per_head_signs(x.shape[1]).to(x.dtype)).to(out)

    def matrices(self, dtype=torch.float64) -> torch.Tensor:
        """The explicit R_h [H, D, D] (the reference the tests compare `rotate` with)."""
        return self.signs.to(dtype)[:, :, None] * hadamard_matrix(self.head_dim, dtype)[None]

    def tensors(self) -> list[torch.Tensor]:
        return [self.signs]


__all__ = ["ROTATIONS", "HadamardRotation", "check_head_dim", "check_rotation", "fwht", "hadamard_matrix",
           "sign_vectors"]
