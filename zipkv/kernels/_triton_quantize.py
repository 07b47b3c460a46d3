"""Triton fused quantize + pack (one read of the fp16/bf16 states, one write of codes and
parameters). Semantics are exactly zipkv.quant.schemes (the reference): min/max in float32,
parameters rounded to their storage dtype before the codes are chosen, IEEE division,
round-half-to-even, plane packing (byte j holds channels j + p*W at shift p*bits).
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

_FP16_MAX = tl.constexpr(65504.0)


@triton.jit
def _round_half_even(x):
    t = x + 0.5
    r = tl.floor(t)
    tie = (r == t) & ((r - 2.0 * tl.floor(r * 0.5)) == 1.0)
    return tl.where(tie, r - 1.0, r)


@triton.jit
def _round_to(x, OUT_DT: tl.constexpr):
    """x rounded to OUT_DT (nearest-even), kept in float32. bf16 is rounded with integer ops:
    Triton's CPU interpreter truncates in fp32 -> bf16 casts (the GPU rounds to nearest)."""
    if OUT_DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
        r = bits.to(tl.float32, bitcast=True)
    else:
        r = x.to(OUT_DT).to(tl.float32)
    return r


@triton.jit
def _params(lo, hi, floor, LEVELS: tl.constexpr, OUT_DT: tl.constexpr, IS_FP16: tl.constexpr):
    """(step, lo) as float32 values exactly representable in OUT_DT, like quant.quantize
    (floor = max(1e-8, smallest normal of OUT_DT): a constant group gets a usable step)."""
    lo = _round_to(lo, OUT_DT)
    step = tl.maximum(tl.math.div_rn(hi - lo, LEVELS * 1.0), floor)
    if IS_FP16:
        step = tl.minimum(step, _FP16_MAX)
    step = _round_to(step, OUT_DT)
    return step, lo


@triton.jit
def _pack(codes, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """codes [BT, D] (float, integral) -> bytes [BT, D*BITS/8] in plane layout."""
    P: tl.constexpr = 8 // BITS
    W: tl.constexpr = D * BITS // 8
    c3 = tl.reshape(codes.to(tl.int32), [BT, P, W])
    shifts = (tl.arange(0, P) * BITS)[None, :, None]
    return tl.sum(c3 << shifts, 1).to(tl.uint8)


@triton.jit
def _keys_kernel(x_ptr, sxb, sxh, sxn, codes_ptr, scb, sch, scn, scale_ptr, min_ptr, ssb, ssh, ssg,
                 range_ptr, range_hi, N, H, GS, CHUNK, floor,
                 D: tl.constexpr, BITS: tl.constexpr, BLOCK_T: tl.constexpr, HAS_RANGE: tl.constexpr,
                 OUT_DT: tl.constexpr, IS_FP16: tl.constexpr):
    """Program (b*H + h, g, c): channelwise min/max over group g's tokens (or, with HAS_RANGE,
    read from range_ptr: float32, laid out as the scales, the highs range_hi elements after the
    lows), then the codes of the group's c-th chunk of CHUNK tokens (without a given range, one
    chunk: the whole group)."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.program_id(2)
    b = bh // H
    h = bh % H
    LEVELS: tl.constexpr = 2 ** BITS - 1
    W: tl.constexpr = D * BITS // 8
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, BLOCK_T)
    t0 = g * GS
    t1 = tl.minimum(t0 + GS, N)
    xb = x_ptr + b * sxb + h * sxh
    pb = b * ssb + h * ssh + g * ssg + offs_d
    if HAS_RANGE:
        lo = tl.load(range_ptr + pb)
        hi = tl.load(range_ptr + range_hi + pb)
    else:
        lo = tl.full([D], float("inf"), tl.float32)
        hi = tl.full([D], float("-inf"), tl.float32)
        for s in range(t0, t1, BLOCK_T):
            rows = s + offs_t
            ok = (rows < t1)[:, None]
            x = tl.load(xb + rows[:, None] * sxn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(tl.where(ok, x, float("inf")), 0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, x, float("-inf")), 0))
    step, lo = _params(lo, hi, floor, LEVELS, OUT_DT, IS_FP16)
    if c == 0:
        tl.store(scale_ptr + pb, step.to(OUT_DT))
        tl.store(min_ptr + pb, lo.to(OUT_DT))
    offs_w = tl.arange(0, W)
    cb = codes_ptr + b * scb + h * sch
    c0 = t0 + c * CHUNK
    t1 = tl.minimum(c0 + CHUNK, t1)
    for s in range(c0, t1, BLOCK_T):
        rows = s + offs_t
        ok = (rows < t1)[:, None]
        x = tl.load(xb + rows[:, None] * sxn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(x - lo[None, :], step[None, :]))
        q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
        tl.store(cb + rows[:, None] * scn + offs_w[None, :], _pack(q, BLOCK_T, D, BITS), mask=ok)


@triton.jit
def _values_kernel(x_ptr, sxb, sxh, sxn, f_ptr, sfb, sfh, codes_ptr, scb, sch, scn,
                   scale_ptr, min_ptr, ssb, ssh, ssn, N, H, floor,
                   D: tl.constexpr, BITS: tl.constexpr, VG: tl.constexpr, BLOCK_T: tl.constexpr,
                   HAS_F: tl.constexpr, OUT_DT: tl.constexpr, IS_FP16: tl.constexpr):
    """Program (b*H + h, token block): tokenwise min/max per group of VG channels (after
    dividing by the channel factors), codes, packing."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    b = bh // H
    h = bh % H
    LEVELS: tl.constexpr = 2 ** BITS - 1
    NG: tl.constexpr = D // VG
    W: tl.constexpr = D * BITS // 8
    offs_d = tl.arange(0, D)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (rows < N)[:, None]
    x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxn + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_F:
        f = tl.load(f_ptr + b * sfb + h * sfh + offs_d)
        x = tl.math.div_rn(x, f[None, :])
    xg = tl.reshape(x, [BLOCK_T, NG, VG])
    lo = tl.min(xg, 2)
    hi = tl.max(xg, 2)
    step, lo = _params(lo, hi, floor, LEVELS, OUT_DT, IS_FP16)
    q = _round_half_even(tl.math.div_rn(xg - lo[:, :, None], step[:, :, None]))
    q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
    offs_g = tl.arange(0, NG)
    pb = b * ssb + h * ssh + rows[:, None] * ssn + offs_g[None, :]
    tl.store(scale_ptr + pb, step.to(OUT_DT), mask=ok)
    tl.store(min_ptr + pb, lo.to(OUT_DT), mask=ok)
    offs_w = tl.arange(0, W)
    packed = _pack(tl.reshape(q, [BLOCK_T, D]), BLOCK_T, D, BITS)
    tl.store(codes_ptr + b * scb + h * sch + rows[:, None] * scn + offs_w[None, :], packed, mask=ok)


def _floor(dtype: torch.dtype) -> float:
    from ..quant.quantizer import MIN_STEP

    return max(MIN_STEP, torch.finfo(dtype).tiny)


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def quantize_keys(keys: torch.Tensor, bits: int, group: int, out_dtype: torch.dtype, block_t: int = 32,
                  chunk: int | None = None):
    """chunk: with one group per (row, head) (group >= N), the group's min / max come from two
    torch reductions and the codes from N / chunk programs per head: a batch-1 prompt is then
    not B * H programs each walking every token twice (8 on 132 SMs for Llama-3-8B)."""
    b, h, n, d = keys.shape
    n_groups = -(-n // group)
    codes = torch.empty((b, h, n, d * bits // 8), dtype=torch.uint8, device=keys.device)
    scale = torch.empty((b, h, n_groups, d), dtype=out_dtype, device=keys.device)
    minimum = torch.empty_like(scale)
    if n == 0:
        return codes, scale, minimum, n_groups
    if chunk is not None and n_groups != 1:
        raise ValueError(f"chunk needs one key group per head (group {group} < {n} tokens)")
    given = chunk is not None
    chunk = chunk if given else group
    # float32 lows and highs, as the reference takes them (a min / max of bf16 values is exact)
    # [2, B, H, 1, D]: the scales' layout (contiguous, G = 1)
    ranges = torch.stack([keys.amin(2, keepdim=True), keys.amax(2, keepdim=True)]).to(torch.float32) if given else scale
    _keys_kernel[(b * h, n_groups, -(-min(group, n) // chunk))](
        keys, keys.stride(0), keys.stride(1), keys.stride(2), codes, codes.stride(0), codes.stride(1), codes.stride(2),
        scale, minimum, scale.stride(0), scale.stride(1), scale.stride(2), ranges, b * h * d, n, h, group, chunk,
        _floor(out_dtype),
        D=d, BITS=bits, BLOCK_T=block_t, HAS_RANGE=given, OUT_DT=_TL[out_dtype], IS_FP16=out_dtype == torch.float16,
        num_warps=4)
    return codes, scale, minimum, n_groups


def quantize_values(values: torch.Tensor, bits: int, group: int, factors: torch.Tensor | None,
                    out_dtype: torch.dtype, block_t: int = 32):
    b, h, n, d = values.shape
    codes = torch.empty((b, h, n, d * bits // 8), dtype=torch.uint8, device=values.device)
    scale = torch.empty((b, h, n, d // group), dtype=out_dtype, device=values.device)
    minimum = torch.empty_like(scale)
    if n == 0:
        return codes, scale, minimum
    f = factors if factors is not None else values
    fs = (factors.stride(0), factors.stride(1)) if factors is not None else (0, 0)
    _values_kernel[(b * h, triton.cdiv(n, block_t))](
        values, values.stride(0), values.stride(1), values.stride(2), f, *fs,
        codes, codes.stride(0), codes.stride(1), codes.stride(2),
        scale, minimum, scale.stride(0), scale.stride(1), scale.stride(2), n, h, _floor(out_dtype),
        D=d, BITS=bits, VG=group, BLOCK_T=block_t, HAS_F=factors is not None,
        OUT_DT=_TL[out_dtype], IS_FP16=out_dtype == torch.float16, num_warps=4)
    return codes, scale, minimum
