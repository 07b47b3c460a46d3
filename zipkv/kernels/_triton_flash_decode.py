"""Triton flash-decoding over a per token-head cache (flash_decode.py is the public wrapper).

Two launches. The split kernel: one program per (batch row, KV head, split of the sequence),
the R query heads of that KV head together (a [BLOCK_H, D] query tile, BLOCK_H >= 16 for the
tensor cores), an online softmax over its split's blocks of BLOCK_N tokens, partial (output,
max, sum) per query head and split. A program whose split starts past its row's length
(lengths[b], read on the device) exits at once, so a ragged batch reads only its valid tokens.
The merge kernel: one program per (batch row, query head), a log-sum-exp merge of the valid
splits (none: a zero output, as the reference).

IEEE: the dots in float32 (float32 queries; bf16 under the CPU interpreter, whose bf16 dots
are wrong with triton 3.9), else in the query's dtype with float32 accumulation.
FORM 0: keys/values as they are (bf16/fp16/fp32). FORM 1: fp8 e4m3 codes (handed over as
uint8 and bitcast here) times a float32 scale per token-head. FORM 2: int4, two codes per byte
(plane layout: channel j low nibble, channel j + D/2 high nibble) times a scale plus a zero per
token-head. The scale and zero are applied to the dot products, never to the tiles:
q.k = scale * (q.codes) + zero * sum(q), and sum_n p_n v_n = (p * scale) @ codes + sum_n p_n zero_n.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))
MAX_SPLITS = 64


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 dots without tf32 rounding
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _flash_split_kernel(q_ptr, sqb, sqh, k_ptr, skb, skh, skn, v_ptr, svb, svh, svn,
                        ks_ptr, vs_ptr, kz_ptr, vz_ptr, spb, sph, len_ptr, o_ptr, m_ptr, l_ptr,
                        HKV, R, S, N, split_len, qk_scale,
                        FORM: tl.constexpr, D: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)  # 64-bit offsets: a 16 x 128K cache passes 2^31 elements
    h = (bh % HKV).to(tl.int64)
    length = tl.minimum(tl.load(len_ptr + b), N)
    start = split * split_len
    if start < length:  # else: past the row's tokens, nothing to read
        end = tl.minimum(start + split_len, length)
        rows = tl.arange(0, BLOCK_H)
        row_ok = rows < R
        cols = tl.arange(0, W)
        q_rows = q_ptr + b * sqb + (h * R + rows)[:, None] * sqh
        q = tl.load(q_rows + cols[None, :], mask=row_ok[:, None], other=0.0)
        if IEEE:
            q = q.to(tl.float32)
        dt = q.dtype  # the dots' input dtype
        if FORM == 2:  # the query's halves meet the low / high nibbles
            q2 = tl.load(q_rows + W + cols[None, :], mask=row_ok[:, None], other=0.0).to(dt)
            q_sum = tl.sum(q.to(tl.float32), 1) + tl.sum(q2.to(tl.float32), 1)
        m_i = tl.full([BLOCK_H], _NEG_INF, tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, W], tl.float32)
        if FORM == 2:
            acc2 = tl.zeros([BLOCK_H, W], tl.float32)
            acc_z = tl.zeros([BLOCK_H], tl.float32)
        k_base = k_ptr + b * skb + h * skh
        v_base = v_ptr + b * svb + h * svh
        p_base = b * spb + h * sph
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            kt = tl.load(k_base + offs_n[:, None] * skn + cols[None, :], mask=valid[:, None], other=0)
            vt = tl.load(v_base + offs_n[:, None] * svn + cols[None, :], mask=valid[:, None], other=0)
            if FORM == 0:
                s = _dot(q, tl.trans(kt.to(dt)), IEEE)
            elif FORM == 1:
                kt = kt.to(tl.float8e4nv, bitcast=True).to(dt)
                ks = tl.load(ks_ptr + p_base + offs_n, mask=valid, other=0.0).to(tl.float32)
                s = _dot(q, tl.trans(kt), IEEE) * ks[None, :]
            else:
                ks = tl.load(ks_ptr + p_base + offs_n, mask=valid, other=0.0).to(tl.float32)
                kz = tl.load(kz_ptr + p_base + offs_n, mask=valid, other=0.0).to(tl.float32)
                s = _dot(q, tl.trans((kt & 15).to(dt)), IEEE) + _dot(q2, tl.trans((kt >> 4).to(dt)), IEEE)
                s = s * ks[None, :] + q_sum[:, None] * kz[None, :]
            s = tl.where(valid[None, :], s * qk_scale, _NEG_INF)
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if FORM == 0:
                acc += _dot(p.to(dt), vt.to(dt), IEEE)
            elif FORM == 1:
                vs = tl.load(vs_ptr + p_base + offs_n, mask=valid, other=0.0).to(tl.float32)
                acc += _dot((p * vs[None, :]).to(dt), vt.to(tl.float8e4nv, bitcast=True).to(dt), IEEE)
            else:
                vs = tl.load(vs_ptr + p_base + offs_n, mask=valid, other=0.0).to(tl.float32)
                vz = tl.load(vz_ptr + p_base + offs_n, mask=valid, other=0.0).to(tl.float32)
                ps = (p * vs[None, :]).to(dt)
                acc += _dot(ps, (vt & 15).to(dt), IEEE)
                acc2 = acc2 * alpha[:, None] + _dot(ps, (vt >> 4).to(dt), IEEE)
                acc_z = acc_z * alpha + tl.sum(p * vz[None, :], 1)
            m_i = m_new
        bq = b * HKV * R + h * R + rows  # query heads of this program
        out_rows = o_ptr + (bq * S + split)[:, None] * D
        if FORM == 2:
            tl.store(out_rows + cols[None, :], acc + acc_z[:, None], mask=row_ok[:, None])
            tl.store(out_rows + W + cols[None, :], acc2 + acc_z[:, None], mask=row_ok[:, None])
        else:
            tl.store(out_rows + cols[None, :], acc, mask=row_ok[:, None])
        tl.store(m_ptr + bq * S + split, m_i, mask=row_ok)
        tl.store(l_ptr + bq * S + split, l_i, mask=row_ok)


@triton.jit
def _flash_merge_kernel(o_ptr, m_ptr, l_ptr, len_ptr, out_ptr, sob, soh, HQ, S, N, split_len,
                        D: tl.constexpr, BLOCK_S: tl.constexpr):
    bq = tl.program_id(0)
    b = bq // HQ
    hq = bq % HQ
    length = tl.minimum(tl.load(len_ptr + b), N)
    n_valid = (length + split_len - 1) // split_len
    s = tl.arange(0, BLOCK_S)
    ok = s < n_valid
    m = tl.load(m_ptr + bq * S + s, mask=ok, other=_NEG_INF)
    l = tl.load(l_ptr + bq * S + s, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(ok, tl.exp2(m - tl.where(m_max == _NEG_INF, 0.0, m_max)), 0.0)
    total = tl.sum(w * l, 0)
    d = tl.arange(0, D)
    o = tl.load(o_ptr + (bq * S + s)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * sob + hq * soh + d, out.to(out_ptr.dtype.element_ty))


FORM_IDS = {"dense": 0, "fp8": 1, "int4": 2}


def split_plan(n: int, programs: int, target: int, block_n: int, num_splits: int | None) -> tuple[int, int]:
    """(splits, tokens per split): about `target` programs over the (row, KV head) pairs, each
    split a whole number of blocks; fixed by the capacity n (not the lengths) so a CUDA graph
    replays it."""
    blocks = triton.cdiv(max(n, 1), block_n)
    if num_splits is None:
        num_splits = triton.cdiv(target, programs)
    num_splits = max(1, min(num_splits, blocks, MAX_SPLITS))
    split_len = triton.cdiv(blocks, num_splits) * block_n
    return triton.cdiv(max(n, 1), split_len), split_len


def flash_decode_triton(query, seg, lengths, scale: float, target_programs: int, block_n: int | None = None,
                        num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    b, hq, _, d = query.shape
    hkv, n = seg.k.shape[1], seg.k.shape[2]
    r = hq // hkv
    block_n = block_n or (64 if d <= 128 else 32)
    splits, split_len = split_plan(n, b * hkv, target_programs, block_n, num_splits)
    form = FORM_IDS[seg.form]
    k, v = (seg.k.view(torch.uint8), seg.v.view(torch.uint8)) if seg.form == "fp8" else (seg.k, seg.v)
    params = [seg.k_scale, seg.v_scale, seg.k_zero, seg.v_zero]
    params = [lengths if t is None else t for t in params]  # never read for the forms without them
    spb, sph = (0, 0) if seg.k_scale is None else seg.k_scale.stride()[:2]
    part_o = torch.empty(b * hq, splits, d, dtype=torch.float32, device=query.device)
    part_m = torch.empty(b * hq, splits, dtype=torch.float32, device=query.device)
    part_l = torch.empty_like(part_m)
    _flash_split_kernel[(b * hkv, splits)](
        query, query.stride(0), query.stride(1), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), *params, spb, sph, lengths, part_o, part_m, part_l,
        hkv, r, splits, n, split_len, scale * 1.4426950408889634,
        FORM=form, D=d, W=d // 2 if form == 2 else d, BLOCK_H=max(16, triton.next_power_of_2(r)), BLOCK_N=block_n,
        IEEE=query.dtype == torch.float32 or (query.device.type != "cuda" and query.dtype == torch.bfloat16),
        num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(b, hq, 1, d, dtype=query.dtype, device=query.device)
    _flash_merge_kernel[(b * hq,)](
        part_o, part_m, part_l, lengths, out, out.stride(0), out.stride(1), hq, splits, n, split_len,
        D=d, BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out


__all__ = ["FORM_IDS", "MAX_SPLITS", "flash_decode_triton", "split_plan"]
