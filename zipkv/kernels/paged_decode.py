"""Decode attention over a PagedStore (zipkv/cache/paged_store.py), through its block table.

- `paged_decode_reference`: per sequence, dequantize its pages (in block-table order) to
  float32 and attend; what the kernel is checked against.
- `paged_decode_attention`: the Triton kernel (`_triton_paged_decode.py`) on CUDA or under
  TRITON_INTERPRET=1 with impl="triton"; else the reference.
query [B, Hq, D] or [B, Hq, 1, D] for sequences 0..B-1 of the store; Hq a multiple of the
store's KV heads (query head i reads KV head i // (Hq / Hkv)).
"""

from __future__ import annotations

import math

import torch

from ._runtime import use_triton


def _checked(query, store, scaling):
    squeeze = query.dim() == 4
    if squeeze:
        if query.shape[2] != 1:
            raise ValueError(f"paged decode takes one query token per sequence (got Tq={query.shape[2]})")
        query = query[:, :, 0]
    if query.dim() != 3:
        raise ValueError(f"query must be [B, Hq, D] or [B, Hq, 1, D] (got shape {tuple(query.shape)})")
    b, hq, d = query.shape
    if d != store.head_dim or hq % store.num_heads:
        raise ValueError(f"query [B, Hq, D={d}] must have D = head_dim {store.head_dim} and Hq a multiple of "
                         f"the store's {store.num_heads} KV heads (got Hq={hq})")
    if b > store.max_seqs:
        raise ValueError(f"query has {b} sequences; the store holds max_seqs={store.max_seqs}")
    return query, squeeze, (1.0 / math.sqrt(d) if scaling is None else float(scaling))


def unsupported(store) -> str | None:
    """Why the Triton kernel cannot read `store` (it tiles a page and a head row with
    power-of-two aranges), or None."""
    for name in ("page_size", "head_dim"):
        value = getattr(store, name)
        if value & (value - 1):
            return f"{name}={value} is not a power of two"
    return None


def paged_decode_reference(query: torch.Tensor, store, scaling: float | None = None) -> torch.Tensor:
    query, squeeze, scaling = _checked(query, store, scaling)
    b, hq, d = query.shape
    groups = hq // store.num_heads
    out = torch.zeros_like(query)
    for seq in range(b):
        keys, values = store.dequantize(seq)  # [H, L, D] float32
        if keys.shape[1] == 0:
            continue
        keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)
        weights = torch.softmax(torch.einsum("hd,hld->hl", query[seq].float(), keys) * scaling, dim=-1)
        out[seq] = torch.einsum("hl,hld->hd", weights, values).to(query.dtype)
    return out[:, :, None] if squeeze else out


def paged_decode_attention(query: torch.Tensor, store, scaling: float | None = None, impl: str = "auto"):
    """Attention of one new query per sequence over its paged packed tokens ([B, Hq(, 1), D])."""
    checked, squeeze, scale = _checked(query, store, scaling)
    if not use_triton(query.device, impl):
        return paged_decode_reference(query, store, scaling)
    reason = unsupported(store)
    if reason is not None:
        if impl == "triton":
            raise ValueError(f"the Triton paged decode kernel cannot read this store: {reason}")
        return paged_decode_reference(query, store, scaling)
    from ._triton_paged_decode import paged_decode_triton

    out = paged_decode_triton(checked, store, scale)
    return out[:, :, None] if squeeze else out
