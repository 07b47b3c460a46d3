"""The packed-tier view the kernels read, and its float32 dequantization (the reference).

Layout (docs/DESIGN.md, `PackedTier`), for one tier whose keys have `bits` and whose values
have `value_bits` (each in {2, 4, 8}; equal unless the tier says otherwise):
- k_codes: uint8 [B, H, N, D*bits/8], v_codes: uint8 [B, H, N, D*value_bits/8], plane
  layout: byte j holds channels j + p*(row bytes) at bit shift p*b, p = 0 .. 8/b - 1
  (b = bits for keys, value_bits for values).
- keys channelwise: k_scale, k_min [B, H, G, D]; token_group int32 [N] (the key group of
  each token, shared by batch rows and heads).
- values tokenwise: v_scale, v_min [B, H, N, D/value_group]; optional channel factors
  v_channel [B, H, C, D] with token_chunk int32 [N].
- x = code * scale + min (values then times v_channel).

This module is deliberately independent of zipkv.quant, so the tests cross-check the two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_FIELDS = ("k_codes", "k_scale", "k_min", "token_group", "v_codes", "v_scale", "v_min", "v_channel", "token_chunk")


@dataclass
class PackedSegment:
    bits: int  # of the keys (and of the values unless value_bits says otherwise)
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    token_group: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    v_channel: torch.Tensor | None = None
    token_chunk: torch.Tensor | None = None
    value_bits: int | None = None  # None: the same as bits

    def __post_init__(self):
        if self.value_bits is None:
            self.value_bits = self.bits

    @property
    def num_tokens(self) -> int:
        return self.k_codes.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_codes.shape[3] * 8 // self.bits

    @property
    def value_group(self) -> int:
        return self.head_dim // self.v_scale.shape[-1]

    def nbytes(self) -> int:
        """Bytes a kernel must read for this segment (codes + all parameters)."""
        total = 0
        for name in _FIELDS:
            t = getattr(self, name)
            if t is not None:
                total += t.numel() * t.element_size()
        return total


def as_segment(tier) -> PackedSegment:
    """A PackedSegment from anything with the PackedTier attributes (duck typing)."""
    if isinstance(tier, PackedSegment):
        return tier
    missing = [n for n in ("bits",) + _FIELDS[:7] if not hasattr(tier, n)]
    if missing:
        raise ValueError(f"tier lacks the PackedTier attributes {missing}")
    kw = {n: getattr(tier, n, None) for n in _FIELDS}
    value_bits = getattr(tier, "value_bits", None)
    return PackedSegment(bits=int(tier.bits), value_bits=None if value_bits is None else int(value_bits), **kw)


def with_int32_indices(seg: PackedSegment) -> PackedSegment:
    """The segment with int32 token_group / token_chunk, what the kernels read (no copy
    when they already are)."""
    return dataclasses.replace(seg, token_group=seg.token_group.to(torch.int32),
                               token_chunk=None if seg.token_chunk is None else seg.token_chunk.to(torch.int32))


def validate_segment(seg: PackedSegment, batch: int, heads: int, head_dim: int, name: str = "tiers") -> None:
    for field in ("bits", "value_bits"):
        if getattr(seg, field) not in (2, 4, 8):
            raise ValueError(f"{name}: {field} must be one of (2, 4, 8) (got {getattr(seg, field)})")
    n = seg.num_tokens
    for field, bits in (("k_codes", seg.bits), ("v_codes", seg.value_bits)):
        t = getattr(seg, field)
        width = head_dim * bits // 8
        if t.dtype != torch.uint8 or tuple(t.shape) != (batch, heads, n, width):
            raise ValueError(f"{name}: {field} must be uint8 [{batch}, {heads}, {n}, {width}] (got {t.dtype} {tuple(t.shape)})")
    if seg.k_scale.shape[:2] != (batch, heads) or seg.k_scale.shape[-1] != head_dim or seg.k_min.shape != seg.k_scale.shape:
        raise ValueError(f"{name}: k_scale/k_min must be [B, H, G, D] (got {tuple(seg.k_scale.shape)})")
    if seg.token_group.shape != (n,):
        raise ValueError(f"{name}: token_group must be [N={n}] (got {tuple(seg.token_group.shape)})")
    gv = seg.v_scale.shape[-1]
    if gv < 1 or head_dim % gv or tuple(seg.v_scale.shape) != (batch, heads, n, gv) or seg.v_min.shape != seg.v_scale.shape:
        raise ValueError(f"{name}: v_scale/v_min must be [B, H, N, D/value_group] (got {tuple(seg.v_scale.shape)})")
    if (seg.v_channel is None) != (seg.token_chunk is None):
        raise ValueError(f"{name}: v_channel and token_chunk go together")
    if seg.v_channel is not None:
        if seg.v_channel.shape[:2] != (batch, heads) or seg.v_channel.shape[-1] != head_dim:
            raise ValueError(f"{name}: v_channel must be [B, H, C, D] (got {tuple(seg.v_channel.shape)})")
        if seg.token_chunk.shape != (n,):
            raise ValueError(f"{name}: token_chunk must be [N={n}] (got {tuple(seg.token_chunk.shape)})")


def unpack_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (p * bits)) & mask for p in range(8 // bits)], dim=-1)


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    width = codes.shape[-1] * bits // 8
    planes = codes.to(torch.uint8).split(width, dim=-1)
    out = planes[0].clone()
    for p in range(1, len(planes)):
        out |= planes[p] << (p * bits)
    return out


def dequantize_segment(seg: PackedSegment) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) float32 [B, H, N, D]."""
    kc = unpack_planes(seg.k_codes, seg.bits).float()
    g = seg.token_group.long()
    keys = kc * seg.k_scale.float()[:, :, g] + seg.k_min.float()[:, :, g]
    vc = unpack_planes(seg.v_codes, seg.value_bits).float()
    b, h, n, d = vc.shape
    groups = seg.v_scale.shape[-1]
    vc = vc.reshape(b, h, n, groups, d // groups)
    values = (vc * seg.v_scale.float()[..., None] + seg.v_min.float()[..., None]).reshape(b, h, n, d)
    if seg.v_channel is not None:
        values = values * seg.v_channel.float()[:, :, seg.token_chunk.long()]
    return keys, values
