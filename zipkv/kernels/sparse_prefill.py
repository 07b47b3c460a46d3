"""ZipVL sparse prefill: causal attention among the kept (important) tokens only.

sparse_prefill_attention(q [B, Hq, S, D], k, v [B, Hkv, S, D], keep_idx [B, n] int, sorted
ascending per row) -> [B, Hq, n, D]: the outputs of the kept query rows, each attending to
the kept keys at or before its position. Two implementations (benchmarks/kernel_bench.py
measures both):
- "gather": gather Q/K/V rows, then SDPA (is_causal, enable_gqa): the kept order is the
  position order, so causal in kept order is causal in positions.
- "triton": one flash-attention kernel reading rows through the indices (no copies).

Every implementation is causal in the KEPT order (slot i sees slots 0..i). A batch whose rows
keep different counts is therefore padded at the END of each row's index list (with the
row's last kept index, so rows stay sorted): a padding slot comes after every real slot of
its row, no real slot can see it, and its output is discarded. `sparse_prefill_scatter` does
that and returns the full-length output, zero for the rows not kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._runtime import use_triton

IMPLS = ("auto", "gather", "triton", "reference")


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def sparse_prefill_reference(q, k, v, keep_idx, scale=None):
    idx = keep_idx.long()
    qg, kg, vg = (_gather(x.float(), idx) for x in (q, k, v))
    r = q.shape[1] // k.shape[1]
    kg, vg = kg.repeat_interleave(r, 1), vg.repeat_interleave(r, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = qg @ kg.transpose(-1, -2) * scale
    n = idx.shape[1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (torch.softmax(s, -1) @ vg).to(q.dtype)


def sparse_prefill_attention(q, k, v, keep_idx, scale=None, impl: str = "auto", **tuning):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} (got {impl!r})")
    if keep_idx.dim() != 2 or keep_idx.shape[0] != q.shape[0]:
        raise ValueError(f"keep_idx must be [B={q.shape[0]}, n] (got {tuple(keep_idx.shape)})")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of the KV heads {k.shape[1]}")
    if impl == "reference":
        return sparse_prefill_reference(q, k, v, keep_idx, scale)
    if impl == "triton" and use_triton(q.device, "triton"):
        from ._triton_sparse import sparse_attention_triton

        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return sparse_attention_triton(q, k, v, keep_idx, scale, **tuning)
    idx = keep_idx.long()
    return F.scaled_dot_product_attention(_gather(q, idx), _gather(k, idx), _gather(v, idx),
                                          is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def pad_keep_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, S] kept flags -> (keep_idx int64 [B, n] ascending, end-padded with the row's
    last kept index; counts int64 [B]), n = the largest count (at least 1)."""
    b = keep.shape[0]
    counts = keep.sum(1).to(torch.int64)
    n = max(int(counts.max()) if b else 0, 1)
    # kept positions first, ascending (stable sort on "not kept"), then the rest
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]
    last = order.gather(1, (counts - 1).clamp(min=0)[:, None])
    slots = torch.arange(n, device=keep.device)[None, :]
    return torch.where(slots < counts[:, None], order, last), counts


def sparse_prefill_scatter(q, k, v, keep_idx, counts, scale=None, impl: str = "auto", **tuning):
    """[B, Hq, S, D]: sparse_prefill_attention's outputs put back at their positions; the rows
    not kept (and the slots past counts[b], the end padding) get exactly zero."""
    b, hq, s, d = q.shape
    rows = sparse_prefill_attention(q, k, v, keep_idx, scale, impl=impl, **tuning)  # [B, Hq, n, D]
    n = keep_idx.shape[1]
    real = torch.arange(n, device=q.device)[None, :] < counts.to(q.device)[:, None]
    target = torch.where(real, keep_idx.to(q.device).long(), s)  # padding slots go to a scratch row S
    out = rows.new_zeros(b, hq, s + 1, d)
    out.scatter_(2, target[:, None, :, None].expand(-1, hq, -1, d), rows)
    return out[:, :, :s]


__all__ = ["sparse_prefill_attention", "sparse_prefill_reference", "sparse_prefill_scatter", "pad_keep_indices"]
