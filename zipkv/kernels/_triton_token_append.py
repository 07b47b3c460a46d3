"""Triton kernel of token_append.py: a decode step's new token into a static baseline layer's
capacity buffers, in one launch per layer and step.

One program per batch row b (it alone reads and advances lengths[b], so no other program can
see the count move): the row's H heads as [BLOCK_H, D] tiles of keys and values, quantized per
token-head as zipkv/quant/token_head.py does (fp8 e4m3 with a float32 scale; int4 with a 16-bit
scale and zero, two plane-packed codes per byte; "dense": a copy), written at slot lengths[b],
nonfinite set when any element is NaN/inf, then lengths[b] += 1.

Bit-exact with the PyTorch reference, so every rounding is spelled out:
- divisions are IEEE (div_rn: Triton's `/` on float32 is an approximate division on CUDA);
  except that torch on CUDA divides by a Python number through its reciprocal (a * (1 / b),
  ATen's div_true_kernel_cuda), which RECIP reproduces (the reference's `/ 448` and `/ 15`);
- round-half-even to an integer by adding and removing 1.5 * 2^23 (libdevice.rint has no
  interpreter implementation);
- float32 -> bf16 and float32 -> e4m3 on the bits (ties to even; the interpreter truncates
  both casts), float32 -> fp16 by the cast (ties to even on CUDA and in the interpreter);
- no multiply-add contracted into an FMA (enable_fp_fusion=False): each product rounds alone,
  as in torch's elementwise kernels.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ..quant.quantizer import FP16_MAX, MIN_STEP
from ..quant.token_head import FP8_MAX, FP8_MIN_SCALE

LEVELS = 15  # int4 codes 0..15
FORM_IDS = {"dense": 0, "fp8": 1, "int4": 2}
TILE = 4096  # elements of one [BLOCK_H, D] tile: the heads are taken BLOCK_H at a time

_INF = tl.constexpr(float("inf"))
_RINT_SHIFT = tl.constexpr(12582912.0)  # 1.5 * 2^23: float32 x + it has no fraction bits left


@triton.jit
def _rint(x):
    """Nearest integer, ties to even, for |x| < 2^22 (no fast-math: the pair is not folded)."""
    return (x + _RINT_SHIFT) - _RINT_SHIFT


@triton.jit
def _divide(a, b, inv_b, RECIP: tl.constexpr):
    """a / b, b a Python number in the reference: IEEE, or a * fp32(1 / b) as torch on CUDA."""
    if RECIP:
        return a * inv_b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _bf16_round(x):
    """float32 -> (the nearest bf16 as float32, its 16 bits as int16), ties to even."""
    bits = x.to(tl.int32, bitcast=True)
    r = bits + 0x7FFF + ((bits >> 16) & 1)
    return (r & -65536).to(tl.float32, bitcast=True), (r >> 16).to(tl.int16)


@triton.jit
def _param_round(x, BF16: tl.constexpr):
    """float32 -> (the nearest value of the 16-bit parameter dtype as float32, what to store)."""
    if BF16:
        return _bf16_round(x)
    else:
        h = x.to(tl.float16)
        return h.to(tl.float32), h


@triton.jit
def _e4m3_bits(v):
    """float32 |v| <= 448 -> its float8_e4m3fn byte, nearest with ties to even (torch's cast)."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    # the float32 bits rounded to 3 mantissa bits, then the exponent rebiased 127 -> 7
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    sub = _rint(a * 512.0).to(tl.int32)  # below 2^-6: multiples of 2^-9, codes 0..8
    code = tl.where(a < 0.015625, sub, normal)
    negative = v.to(tl.int32, bitcast=True) < 0  # -0.0 too: torch keeps its sign bit
    return (code | tl.where(negative, 128, 0)).to(tl.uint8)


@triton.jit
def _count_nonfinite(x):
    xf = x.to(tl.float32)
    return tl.sum(((xf != xf) | (tl.abs(xf) == _INF)).to(tl.int32))


@triton.jit
def _append_side(x_ptr, sxb, sxh, c_ptr, scb, sch, scn, s_ptr, z_ptr, spb, sph, spn, b, slot, heads, H, N,
                 fp8_max, inv_fp8_max, min_scale, levels, inv_levels, step_floor, param_max,
                 FORM: tl.constexpr, D: tl.constexpr, PARAM_BF16: tl.constexpr, RECIP: tl.constexpr):
    """Heads `heads` of row b of one side (keys or values) into its buffers at `slot`; returns
    how many of its elements are NaN/inf."""
    rows = heads < H
    keep = rows & (heads * 0 + slot < N)  # (a vector compare: the interpreter's `bool & scalar bool` is int32)
    x_row = x_ptr + b * sxb + heads[:, None] * sxh
    c_row = c_ptr + b * scb + heads[:, None] * sch + slot * scn
    p_off = b * spb + heads * sph + slot * spn
    if FORM == 2:  # the channels' halves: low / high nibbles of the same bytes
        cols = tl.arange(0, D // 2)
        lo_x = tl.load(x_row + cols[None, :], mask=rows[:, None], other=0.0)
        hi_x = tl.load(x_row + D // 2 + cols[None, :], mask=rows[:, None], other=0.0)
        n_bad = _count_nonfinite(lo_x) + _count_nonfinite(hi_x)
        lo_f, hi_f = lo_x.to(tl.float32), hi_x.to(tl.float32)
        lo = tl.minimum(tl.min(lo_f, 1), tl.min(hi_f, 1))
        hi = tl.maximum(tl.max(lo_f, 1), tl.max(hi_f, 1))
        zero, zero_out = _param_round(lo, PARAM_BF16)  # the codes are chosen against the stored zero
        step = tl.maximum(_divide(hi - zero, levels, inv_levels, RECIP), step_floor)
        if not PARAM_BF16:
            step = tl.minimum(step, param_max)
        step, step_out = _param_round(step, PARAM_BF16)
        q_lo = _rint(tl.minimum(tl.maximum(tl.math.div_rn(lo_f - zero[:, None], step[:, None]), 0.0), levels))
        q_hi = _rint(tl.minimum(tl.maximum(tl.math.div_rn(hi_f - zero[:, None], step[:, None]), 0.0), levels))
        packed = (q_lo.to(tl.int32) | (q_hi.to(tl.int32) << 4)).to(tl.uint8)
        tl.store(c_row + cols[None, :], packed, mask=keep[:, None])
        tl.store(s_ptr + p_off, step_out, mask=keep)
        tl.store(z_ptr + p_off, zero_out, mask=keep)
    else:
        cols = tl.arange(0, D)
        x = tl.load(x_row + cols[None, :], mask=rows[:, None], other=0.0)
        n_bad = _count_nonfinite(x)
        if FORM == 0:
            tl.store(c_row + cols[None, :], x, mask=keep[:, None])
        else:
            xf = x.to(tl.float32)
            scale = tl.maximum(_divide(tl.max(tl.abs(xf), 1), fp8_max, inv_fp8_max, RECIP), min_scale)
            # clamped: a quotient a rounding took past the largest code would be NaN (e4m3fn has no inf)
            v = tl.minimum(tl.maximum(tl.math.div_rn(xf, scale[:, None]), -fp8_max), fp8_max)
            tl.store(c_row + cols[None, :], _e4m3_bits(v), mask=keep[:, None])
            tl.store(s_ptr + p_off, scale, mask=keep)
    return n_bad


@triton.jit
def _token_append_kernel(k_ptr, skb, skh, v_ptr, svb, svh,
                         kc_ptr, skcb, skch, skcn, vc_ptr, svcb, svch, svcn,
                         ks_ptr, vs_ptr, kz_ptr, vz_ptr, spb, sph, spn,
                         len_ptr, bad_ptr, H, N, fp8_max, inv_fp8_max, min_scale, levels, inv_levels, step_floor,
                         param_max, FORM: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                         PARAM_BF16: tl.constexpr, RECIP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a 16 x 128K cache passes 2^31 elements
    slot = tl.load(len_ptr + b).to(tl.int64)
    room = slot < N  # a full row is left alone (the host refuses that step before it runs)
    n_bad = tl.zeros([1], tl.int32)
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        n_bad += _append_side(k_ptr, skb, skh, kc_ptr, skcb, skch, skcn, ks_ptr, kz_ptr, spb, sph, spn, b, slot,
                              heads, H, N, fp8_max, inv_fp8_max, min_scale, levels, inv_levels, step_floor,
                              param_max, FORM, D, PARAM_BF16, RECIP)
        n_bad += _append_side(v_ptr, svb, svh, vc_ptr, svcb, svch, svcn, vs_ptr, vz_ptr, spb, sph, spn, b, slot,
                              heads, H, N, fp8_max, inv_fp8_max, min_scale, levels, inv_levels, step_floor,
                              param_max, FORM, D, PARAM_BF16, RECIP)
    flag = tl.arange(0, 1)
    tl.store(bad_ptr + flag, tl.full([1], 1, tl.uint8), mask=n_bad > 0)  # every writer writes 1: no race
    tl.store(len_ptr + b, (slot + 1).to(tl.int32), mask=room)


def reciprocal(x: float) -> float:
    """fp32(1 / x): the factor torch on CUDA multiplies by for `tensor / x`."""
    return float(np.float32(1.0 / x))


def _code_bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 codes as uint8 (a view): the kernel writes their bits."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _param_bits(t: torch.Tensor | None) -> torch.Tensor | None:
    """bf16 scales / zeros as int16 (a view): the kernel writes their bits."""
    return t.view(torch.int16) if t is not None and t.dtype == torch.bfloat16 else t


def token_append_triton(keys, values, seg, lengths, nonfinite) -> None:
    """token_append's kernel path (token_append.append_supported(...) is None for these inputs)."""
    b, h, _, d = keys.shape
    kc, vc = _code_bits(seg.k), _code_bits(seg.v)
    params = [_param_bits(t) for t in (seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero)]
    # a form without scales / zeros passes its codes in their place (never read: FORM says so)
    ks, vs, kz, vz = (kc if t is None else t for t in params)
    sp = (0, 0, 0) if seg.k_scale is None else seg.k_scale.stride()
    param_bf16 = seg.k_scale is not None and seg.k_scale.dtype == torch.bfloat16
    floor = max(MIN_STEP, torch.finfo(torch.bfloat16 if param_bf16 else torch.float16).tiny)  # quantize_range's
    block_h = min(triton.next_power_of_2(h), max(1, TILE // d))
    _token_append_kernel[(b,)](
        keys, keys.stride(0), keys.stride(1), values, values.stride(0), values.stride(1),
        kc, *kc.stride()[:3], vc, *vc.stride()[:3], ks, vs, kz, vz, *sp,
        lengths, nonfinite.view(torch.uint8), h, seg.k.shape[2], FP8_MAX, reciprocal(FP8_MAX), FP8_MIN_SCALE,
        float(LEVELS), reciprocal(LEVELS), floor, FP16_MAX,
        FORM=FORM_IDS[seg.form], D=d, BLOCK_H=block_h, PARAM_BF16=param_bf16, RECIP=keys.device.type == "cuda",
        num_warps=4, enable_fp_fusion=False)
