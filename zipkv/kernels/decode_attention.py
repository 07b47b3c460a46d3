"""Decode attention over a mixed cache: packed tiers (2/4/8-bit) followed by an fp16 part.

Key order (docs/DESIGN.md): [tiers[0] | tiers[1] | ... | fp16 part]; `mask` is over that order.
`query` [B, Hq, Tq, D] (Tq = 1 for plain decode, a few for chunked/speculative decode),
GQA with Hq = R * Hkv (query head i reads KV head i // R).

- `decode_attention_reference`: dequantize everything to float32, softmax in float32.
- `decode_attention`: the one place that routes a decode step. On CUDA (or with
  impl="triton" under TRITON_INTERPRET=1) split-K kernels read codes + scales directly (no
  fp16 copy of the cache): each packed tier the CUDA tensor-core kernel can read goes
  through it (mma_decode.cu, compute capability >= 8.0; `route_tiers`), the other tiers and
  the fp16 part through one Triton launch, then a log-sum-exp merge launch (v5-v9, see
  experiments/NOTES.md). Elsewhere, or for shapes the kernels do not take, the reference.
  `record=` (a dict) says which way it went and describes each launch.

mask: bool (True = attend) or additive float, shaped [B, Nt], [B, Tq, Nt] or [B, 1, Tq, Nt]
(Nt = all tokens); per KV head (bool only): [B, Hkv, 1 or Tq, Nt], e.g. AdaKV's head budgets
(the CUDA tensor-core kernel takes none: such a call reads every tier with the Triton kernel). causal=True additionally hides from query t the keys after its own
position, the queries being the last Tq keys (chunked decode without a mask).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._runtime import use_triton
from .packed import PackedSegment, as_segment, dequantize_segment, validate_segment, with_int32_indices


def _check_inputs(query, segments, k_fp, v_fp):
    if query.dim() != 4:
        raise ValueError(f"query must be [B, Hq, Tq, D] (got shape {tuple(query.shape)})")
    b, hq, tq, d = query.shape
    segs = [as_segment(s) for s in segments]
    if segs:
        heads = segs[0].k_codes.shape[1]
    elif k_fp is not None:
        heads = k_fp.shape[1]
    else:
        raise ValueError("decode_attention needs at least one tier or an fp16 part")
    if heads < 1 or hq % heads:
        raise ValueError(f"query heads {hq} must be a multiple of the KV heads {heads}")
    for i, s in enumerate(segs):
        validate_segment(s, b, heads, d, name=f"tiers[{i}]")
    if (k_fp is None) != (v_fp is None):
        raise ValueError("k_fp and v_fp go together")
    if k_fp is not None:
        if k_fp.dim() != 4 or tuple(k_fp.shape[:2]) != (b, heads) or k_fp.shape[-1] != d or k_fp.shape != v_fp.shape:
            raise ValueError(f"k_fp/v_fp must be [B={b}, H={heads}, N, D={d}] (got {tuple(k_fp.shape)}, {tuple(v_fp.shape)})")
    return segs, heads


def total_tokens(segments, k_fp) -> int:
    n = sum(as_segment(s).num_tokens for s in segments)
    return n + (k_fp.shape[2] if k_fp is not None else 0)


def normalize_mask(mask, batch: int, tq: int, nt: int, heads: int | None = None):
    """Returns (mask4 [B, 1 or Hkv, 1 or Tq, Nt] view or None, kind: 0 none, 1 bool keep, 2
    additive). A per-head mask (dim 1 = the KV heads, `heads`) must be 4-D: a 3-D mask is
    [B, Tq, Nt]."""
    if mask is None:
        return None, 0
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None]
    elif mask.dim() != 4:
        raise ValueError(f"mask must be [B, Nt], [B, Tq, Nt] or [B, 1 or Hkv, Tq, Nt] (got shape {tuple(mask.shape)})")
    if mask.shape[1] != 1 and mask.shape[1] != heads:
        raise ValueError(f"mask: a per-head mask [B, Hkv, Tq, Nt] needs dim 1 = the {heads} KV heads "
                         f"(got shape {tuple(mask.shape)})")
    if mask.shape[1] != 1 and mask.dtype != torch.bool:
        raise ValueError(f"mask: a per-head mask must be bool (got {mask.dtype})")
    if mask.shape[0] != batch or mask.shape[2] not in (1, tq) or mask.shape[3] != nt:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match batch {batch}, Tq {tq}, tokens {nt}")
    return mask, 1 if mask.dtype == torch.bool else 2


def decode_attention_reference(query, tiers=(), k_fp=None, v_fp=None, mask=None, scale=None, causal=False,
                               return_lse: bool = False, scores_out=None):
    """decode_attention in float32 PyTorch over dequantized tiers; scores_out as there (the fp16
    part's scaled scores into its first k_fp.shape[2] slots)."""
    segs, heads = _check_inputs(query, tiers, k_fp, v_fp)
    b, hq, tq, d = query.shape
    keys, values = [], []
    for s in segs:
        k, v = dequantize_segment(s)
        keys.append(k)
        values.append(v)
    if k_fp is not None:
        keys.append(k_fp.float())
        values.append(v_fp.float())
    k = torch.cat(keys, dim=2).repeat_interleave(hq // heads, dim=1)
    v = torch.cat(values, dim=2).repeat_interleave(hq // heads, dim=1)
    nt = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = (query.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, Tq, Nt]
    m4, kind = normalize_mask(mask, b, tq, nt, heads)
    if m4 is not None and m4.shape[1] > 1:
        m4 = m4.repeat_interleave(hq // heads, dim=1)  # per KV head -> its query heads
    if kind == 1:
        s = s.masked_fill(~m4, float("-inf"))
    elif kind == 2:
        s = s + m4.float()
    if causal:
        pos = torch.arange(nt, device=s.device)
        limit = nt - tq + torch.arange(tq, device=s.device)
        s = s.masked_fill(pos[None, :] > limit[:, None], float("-inf"))
    if scores_out is not None and k_fp is not None and k_fp.shape[2]:
        scores_out[:, :, :k_fp.shape[2]] = s[:, :, 0, nt - k_fp.shape[2]:]
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a fully masked row attends nothing: 0
    out = (p @ v).to(query.dtype)
    return (out, torch.logsumexp(s, dim=-1)) if return_lse else out


def _check_lengths(lengths, segs, k_fp, causal, device):
    expected = len(segs) + 1
    if lengths.dtype != torch.int32 or lengths.shape != (expected,) or lengths.device != device:
        raise ValueError(f"lengths must be int32 [{expected}] (one per tier, then the fp16 part) on {device} "
                         f"(got {lengths.dtype} {tuple(lengths.shape)} on {lengths.device})")
    if causal:
        raise ValueError("causal=True needs the real token counts; it cannot be combined with lengths")
    if k_fp is None:
        raise ValueError("lengths needs the fp16 part's buffers k_fp/v_fp (its count is the last entry)")


def valid_parts(segs, k_fp, v_fp, mask, lengths):
    """Capacity buffers cut to their valid tokens (lengths read on the host), and the mask
    (laid out over the capacities) cut alike: what the reference attends over."""
    counts = [int(n) for n in lengths.tolist()]
    cut = [dataclasses.replace(s, k_codes=s.k_codes[:, :, :n], token_group=s.token_group[:n],
                               v_codes=s.v_codes[:, :, :n], v_scale=s.v_scale[:, :, :n], v_min=s.v_min[:, :, :n],
                               token_chunk=None if s.token_chunk is None else s.token_chunk[:n])
           for s, n in zip(segs, counts)]
    if mask is not None:
        starts, offset = [], 0
        for size in [s.num_tokens for s in segs] + [k_fp.shape[2]]:
            starts.append(offset)
            offset += size
        mask = torch.cat([mask[..., a:a + n] for a, n in zip(starts, counts)], dim=-1)
    return cut, k_fp[:, :, :counts[-1]], v_fp[:, :, :counts[-1]], mask


def route_tiers(query, segs, mask_kind: int, mask_rows: bool, causal: bool, cuda_kernel: bool | None = None,
                mma_warps: int = 4, mma_min_blocks: int = 3, mma_ring: int = 4) -> list:
    """Per tier: the (warps, blocks per SM) the CUDA tensor-core kernel reads it with, or None
    (the Triton kernel reads it). cuda_kernel None: the CUDA kernel wherever it can
    (mma_decode.mma_supported); False: never; True: raise for a tier it cannot read.
    mask_rows: the mask has more than one row per batch row (per query row or per KV head),
    which the CUDA kernel does not read."""
    from . import mma_decode

    route = []
    for seg in segs:
        if seg.num_tokens == 0 or cuda_kernel is False:
            route.append(None)
            continue
        seg = with_int32_indices(seg)  # what the launcher hands the kernel
        cfg = None
        reason = mma_decode.mma_supported(query, seg, mask_kind, mask_rows, causal)
        if reason is None:
            cfg = mma_decode.fit_warps(query, seg, mma_warps, mma_min_blocks, mma_ring)
            if cfg is None:
                reason = f"mma_ring={mma_ring} leaves no room for 2 copy stages in 48 KiB"
        if reason and cuda_kernel:
            raise ValueError(f"cuda_kernel=True cannot read this tier: {reason}")
        route.append(cfg)
    return route


def decode_attention(query, tiers=(), k_fp=None, v_fp=None, mask=None, scale=None, causal=False,
                     impl: str = "auto", lengths=None, record: dict | None = None, cuda_kernel: bool | None = None,
                     mma_warps: int = 4, mma_min_blocks: int = 3, return_lse: bool = False, scores_out=None,
                     **tuning):
    """Attention output [B, Hq, Tq, D] in query's dtype. `tiers`: PackedTier-like objects in
    key order; `k_fp`/`v_fp`: the fp16 part [B, Hkv, Nf, D] or None. `tuning` (kernel path):
    block_n, block_n_fp, num_warps, num_stages, programs_per_sm, maxnreg, use_asm, tiers_per_launch,
    dequant (v6: fp16 dequantization in registers before the dots; None = per launch, by key group size),
    mma_ctas_per_sm, mma_ring (the CUDA kernel's blocks per SM in all and copy-ring stages);
    cuda_kernel, mma_warps, mma_min_blocks: see route_tiers.

    return_lse: also return each query row's log-sum-exp of the scaled scores (float32
    [B, Hq, Tq], natural log; -inf for a row that attends nothing): (output, lse). A step that
    needs the attention probability of a few keys (a tiered layer's window scores) gets it as
    exp(scale * q.k - lse) without a second pass over the cache.

    scores_out: None, or float32 [B, Hq, Nf] for one query token (Tq = 1) and an fp16 part
    k_fp of Nf slots (capacity): the fp16 part's scaled scores scale * q.k (natural units; -inf
    where the mask hides a slot) written by the pass that attends over them; with `lengths`,
    slots past the fp16 part's count are left as they were. H2O's step reads these instead of
    the keys (kernels/attention_mass.py: attention_mass_from_scores).

    record: None, or a dict filled with "route" ("reference" or "kernels"), "reason" (why
    the reference, when the kernels were wanted), "cuda_tiers" (tiers the CUDA kernel read)
    and, on the kernel path, one entry per launch under "mma" and "triton"
    (_triton_decode.triton_decode_attention): what benchmarks and tests read, per call.

    lengths (preallocated buffers, CUDA graphs): int32 [len(tiers) + 1] on the query's device,
    the valid tokens of each tier and of the fp16 part; the tiers' tensors and k_fp/v_fp are
    then capacity buffers whose first `lengths[i]` tokens count, and `mask` is laid out over
    the capacities. The Triton kernel reads the counts on the device (nothing on the host
    changes from step to step); the reference reads them on the host."""
    segs, heads = _check_inputs(query, tiers, k_fp, v_fp)
    if scores_out is not None:
        _check_scores_out(scores_out, query, k_fp)
    if lengths is not None:
        _check_lengths(lengths, segs, k_fp, causal, query.device)
        if record is None and not tuning and impl == "auto" and cuda_kernel is None and mma_warps == 4 \
                and mma_min_blocks == 3:
            from . import ops

            if ops.tracing():  # torch.compile: one custom op (kernels/ops.py) instead of a graph break
                tensors, bits = ops.flatten_segments(segs)
                scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
                if scores_out is not None:
                    out, lse = ops.decode_attention_scores_op(query, tensors, bits, k_fp, v_fp, mask, scale, lengths,
                                                              scores_out)
                else:
                    out, lse = ops.decode_attention_op(query, tensors, bits, k_fp, v_fp, mask, scale, lengths,
                                                       return_lse)
                return (out, lse) if return_lse else out
    reason = None
    if use_triton(query.device, impl):
        from ._triton_decode import supported

        reason = supported(query, segs)
        if reason is not None and impl == "triton":
            raise ValueError(f"impl='triton' cannot run this shape: {reason}")
    if reason is not None or not use_triton(query.device, impl):
        if record is not None:
            record.update(route="reference", reason=reason, cuda_tiers=0)
        if lengths is not None:
            segs, k_fp, v_fp, mask = valid_parts(segs, k_fp, v_fp, mask, lengths)
        return decode_attention_reference(query, segs, k_fp, v_fp, mask, scale, causal, return_lse, scores_out)
    from ._triton_decode import triton_decode_attention

    b, _, tq, d = query.shape
    m4, kind = normalize_mask(mask, b, tq, total_tokens(segs, k_fp), heads)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # the CUDA kernel takes one keep-mask row per batch row: per-query-row and per-head masks
    # route every tier to the Triton kernel (route_tiers' mask_rows)
    cuda_tiers = route_tiers(query, segs, kind, m4 is not None and (m4.shape[1] > 1 or m4.shape[2] > 1), causal,
                             cuda_kernel, mma_warps, mma_min_blocks, tuning.get("mma_ring", 4))
    if record is not None:
        record.update(route="kernels", reason=None, cuda_tiers=sum(c is not None for c in cuda_tiers))
    return triton_decode_attention(query, segs, k_fp, v_fp, m4, kind, scale, causal, lengths=lengths,
                                   cuda_tiers=cuda_tiers, record=record, return_lse=return_lse,
                                   scores_out=scores_out, **tuning)


def _check_scores_out(scores_out, query, k_fp) -> None:
    b, hq, tq, _ = query.shape
    if k_fp is None or tq != 1:
        raise ValueError(f"scores_out needs an fp16 part (k_fp) and one query token (got k_fp "
                         f"{'None' if k_fp is None else tuple(k_fp.shape)}, Tq {tq})")
    want = (b, hq, k_fp.shape[2])
    if scores_out.dtype != torch.float32 or tuple(scores_out.shape) != want or scores_out.stride(-1) != 1:
        raise ValueError(f"scores_out must be float32 [B, Hq, Nf] = {want} with unit last stride "
                         f"(got {scores_out.dtype} {tuple(scores_out.shape)})")


__all__ = ["PackedSegment", "decode_attention", "decode_attention_reference", "normalize_mask", "route_tiers",
           "total_tokens"]
