"""Triton kernels of attention_mass.py: a decode step's attention probabilities added to
per-slot totals, and the lowest eligible slot, for any number of slots.

`_mass_kernel`, program (block, b * Hkv + h): one block of BLOCK slots of one (row, KV head).
MASS: reads the block's keys once, and for each of the R query heads of that KV head
p_j = exp2(s_j - lse2) with s_j = q . k_j * scale * log2(e) and lse2 the head's log-sum-exp
(natural log, from the decode attention, times log2(e)); totals += the mean over the R heads.
CHOOSE: the block's lowest (total, stamp) among its eligible slots (visible and
stamp <= newest - recent[b]), written as one partial (total, stamp, slot) per block.
`_mass_dot_kernel` (the default MASS path), program (chunk, b * Hkv + h): the same over a
chunk of DOT_CHUNK slots, the R heads' scores of each block of DOT_BLOCK slots as one
tensor-core product over the keys as stored; one partial per chunk.
`_choice_merge_kernel`, program b * Hkv + h: the lowest of its blocks' partials -> free[b, h].

All counts (lengths, newest, recent) are read on the device: a CUDA graph replays the
launches unchanged. Row and head offsets are 64-bit (B * H * N * D passes 2**31 at 128K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import interpreter_enabled

_NEG_INF = tl.constexpr(float("-inf"))
_INF = tl.constexpr(float("inf"))
_NO_STAMP = tl.constexpr(2147483647)  # int32 max: no eligible slot in this block
_LOG2E = 1.4426950408889634
MERGE_CHUNK = 1024  # partials a merge program reads per iteration


@triton.jit(do_not_specialize=["n_last"])
def _mass_kernel(q_ptr, sqb, sqh, lse_ptr, slb, slh, k_ptr, skb, skh, skn,
                 len_ptr, n_last, real_ptr, srb, srh, tot_ptr, stb, sth,
                 stamp_ptr, ssb, ssh, newest_ptr, recent_ptr, pt_ptr, ps_ptr, pn_ptr,
                 HKV, N, NB, qk_scale,
                 R: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, MASS: tl.constexpr, CHOOSE: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < N
    n = tl.load(len_ptr + n_last)
    real = tl.load(real_ptr + b * srb + h * srh + offs, mask=inside, other=0) != 0
    visible = inside & (offs < n) & real
    tot_at = tot_ptr + b * stb + h * sth + offs
    tot = tl.load(tot_at, mask=inside, other=0.0)
    if MASS:
        offs_d = tl.arange(0, D)
        # keys of invisible slots are never read (holes, slots past the count)
        k = tl.load(k_ptr + b * skb + h * skh + offs[:, None] * skn + offs_d[None, :],
                    mask=visible[:, None], other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(R):
            head = h * R + r
            q = tl.load(q_ptr + b * sqb + head * sqh + offs_d).to(tl.float32)
            lse2 = tl.load(lse_ptr + b * slb + head * slh) * 1.4426950408889634
            s = tl.sum(k * q[None, :], 1) * qk_scale
            # a head that attends nothing (lse -inf) adds nothing, as the reference's zeros
            attends = lse2 > _NEG_INF
            lse2 = tl.where(attends, lse2, 0.0)
            p = tl.where(visible, tl.exp2(tl.where(visible, s - lse2, 0.0)), 0.0)
            acc += tl.where(attends, p, 0.0)
        tot = tot + acc / R
        tl.store(tot_at, tot, mask=inside)
    if CHOOSE:
        stamp = tl.load(stamp_ptr + b * ssb + h * ssh + offs, mask=inside, other=0)
        limit = tl.load(newest_ptr) - tl.load(recent_ptr + b)
        eligible = visible & (stamp <= limit)
        t = tl.where(eligible, tot, _INF)
        t_min = tl.min(t, 0)
        tied = eligible & (t == t_min)
        s_min = tl.min(tl.where(tied, stamp, _NO_STAMP), 0)
        slot = tl.min(tl.where(tied & (stamp == s_min), offs, _NO_STAMP), 0)
        at = bh.to(tl.int64) * NB + blk
        tl.store(pt_ptr + at, t_min)
        tl.store(ps_ptr + at, s_min)
        tl.store(pn_ptr + at, slot)


@triton.jit
def _chunk_program(HKV, len_ptr, n_last, RP: tl.constexpr):
    """A chunk program's (chunk, b * Hkv + h, b, h as 64-bit, the slot count read on the
    device, the RP query-head lanes)."""
    bh = tl.program_id(1)
    return (tl.program_id(0), bh, (bh // HKV).to(tl.int64), (bh % HKV).to(tl.int64), tl.load(len_ptr + n_last),
            tl.arange(0, RP))


@triton.jit
def _fold_choice(tot, stamp, eligible, offs, best_t, best_s, best_n):
    """The running (total, stamp, slot) choice of a chunk, folded with one block's eligible
    slots: the lowest total, the lowest stamp among equal totals."""
    t = tl.where(eligible, tot, _INF)
    t_min = tl.min(t, 0)
    tied = eligible & (t == t_min)
    s_min = tl.min(tl.where(tied, stamp, _NO_STAMP), 0)
    n_min = tl.min(tl.where(tied & (stamp == s_min), offs, _NO_STAMP), 0)
    better = (s_min != _NO_STAMP) & ((t_min < best_t) | ((t_min == best_t) & (s_min < best_s)))
    return tl.where(better, t_min, best_t), tl.where(better, s_min, best_s), tl.where(better, n_min, best_n)


@triton.jit
def _head_lse2(lse_row, heads, stride, R: tl.constexpr):
    """The RP lanes' log-sum-exp in base 2 (lane r: query head h * R + r, lse_row at head
    h * R): +inf for pad lanes (r >= R) and for a head that attends nothing (lse -inf), so
    exp2(s - lse2) is 0 there."""
    lse2 = tl.load(lse_row + heads * stride, mask=heads < R, other=float("inf")) * 1.4426950408889634
    return tl.where(lse2 > _NEG_INF, lse2, _INF)


@triton.jit
def _block_slots(start, N, n, real_row, BLOCK: tl.constexpr):
    """Slots start .. start + BLOCK: their offsets, which exist (< N) and which are visible
    (before the device count n and real)."""
    offs = start + tl.arange(0, BLOCK)
    inside = offs < N
    real = tl.load(real_row + offs, mask=inside, other=0) != 0
    return offs, inside, inside & (offs < n) & real


@triton.jit
def _add_totals(tot_row, offs, inside, added):
    """totals[offs] += added (stored), the new totals returned for the choice."""
    tot = tl.load(tot_row + offs, mask=inside, other=0.0) + added
    tl.store(tot_row + offs, tot, mask=inside)
    return tot


@triton.jit(do_not_specialize=["n_last"])
def _mass_dot_kernel(q_ptr, sqb, sqh, lse_ptr, slb, slh, k_ptr, skb, skh, skn,
                     len_ptr, n_last, real_ptr, srb, srh, tot_ptr, stb, sth,
                     stamp_ptr, ssb, ssh, newest_ptr, recent_ptr, pt_ptr, ps_ptr, pn_ptr,
                     HKV, N, NB, qk_scale,
                     R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                     CHOOSE: tl.constexpr, IEEE: tl.constexpr):
    """MASS (+ CHOOSE) over CHUNK slots in blocks of BLOCK: the R query heads' scores of a
    block as one [BLOCK, D] x [D, RP] tensor-core product on the keys as stored (RP: R padded
    to the product's minimum width; the pad heads and a head that attends nothing read
    lse = +inf, so their p is 0), the loop's loads pipelined; one (total, stamp, slot)
    partial per chunk."""
    chunk, bh, b, h, n, heads = _chunk_program(HKV, len_ptr, n_last, RP)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + (h * R + heads[:, None]) * sqh + offs_d[None, :], mask=heads[:, None] < R,
                other=0.0)  # [RP, D]
    lse2 = _head_lse2(lse_ptr + b * slb + h * R * slh, heads, slh, R)
    best_t = float("inf")
    best_s = 2147483647
    best_n = 0
    if CHOOSE:
        limit = tl.load(newest_ptr) - tl.load(recent_ptr + b)
    for start in range(chunk * CHUNK, tl.minimum((chunk + 1) * CHUNK, N), BLOCK):
        offs, inside, visible = _block_slots(start, N, n, real_ptr + b * srb + h * srh, BLOCK)
        k = tl.load(k_ptr + b * skb + h * skh + offs[:, None] * skn + offs_d[None, :], mask=visible[:, None],
                    other=0.0)
        if IEEE:  # float32 states (and bf16 under the interpreter, whose bf16 products are wrong)
            s = tl.dot(k.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(k, tl.trans(q))
        p = tl.exp2(s * qk_scale - lse2[None, :])  # [BLOCK, RP]
        tot = _add_totals(tot_ptr + b * stb + h * sth, offs, inside, tl.sum(tl.where(visible[:, None], p, 0.0), 1) / R)
        if CHOOSE:
            stamp = tl.load(stamp_ptr + b * ssb + h * ssh + offs, mask=inside, other=0)
            best_t, best_s, best_n = _fold_choice(tot, stamp, visible & (stamp <= limit), offs, best_t, best_s, best_n)
    if CHOOSE:
        at = bh.to(tl.int64) * NB + chunk
        tl.store(pt_ptr + at, best_t)
        tl.store(ps_ptr + at, best_s)
        tl.store(pn_ptr + at, best_n)


@triton.jit(do_not_specialize=["n_last"])
def _scores_mass_kernel(sc_ptr, scb, sch, lse_ptr, slb, slh, len_ptr, n_last, real_ptr, srb, srh, tot_ptr, stb, sth,
                        stamp_ptr, ssb, ssh, newest_ptr, recent_ptr, pt_ptr, ps_ptr, pn_ptr, HKV, N, NB,
                        R: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """MASS + CHOOSE from the scores the decode attention wrote (scale * q.k, natural units,
    [B, Hq, N]): p = exp(s - lse) of the R heads of KV head h, read as one [RP, BLOCK] tile per
    block of slots (pad heads: lse +inf); per slot R x 4 bytes instead of the key's D x 2."""
    chunk, bh, b, h, n, heads = _chunk_program(HKV, len_ptr, n_last, RP)
    lse2 = _head_lse2(lse_ptr + b * slb + h * R * slh, heads, slh, R)
    row = sc_ptr + b * scb + (h * R + heads) * sch
    best_t = float("inf")
    best_s = 2147483647
    best_n = 0
    limit = tl.load(newest_ptr) - tl.load(recent_ptr + b)
    for start in range(chunk * CHUNK, tl.minimum((chunk + 1) * CHUNK, N), BLOCK):
        offs, inside, visible = _block_slots(start, N, n, real_ptr + b * srb + h * srh, BLOCK)
        sc = tl.load(row[:, None] + offs[None, :], mask=(heads < R)[:, None] & visible[None, :], other=_NEG_INF)
        p = tl.exp2(sc * 1.4426950408889634 - lse2[:, None])  # [RP, BLOCK]; masked: exp2(-inf) = 0
        tot = _add_totals(tot_ptr + b * stb + h * sth, offs, inside, tl.sum(p, 0) / R)
        stamp = tl.load(stamp_ptr + b * ssb + h * ssh + offs, mask=inside, other=0)
        best_t, best_s, best_n = _fold_choice(tot, stamp, visible & (stamp <= limit), offs, best_t, best_s, best_n)
    at = bh.to(tl.int64) * NB + chunk
    tl.store(pt_ptr + at, best_t)
    tl.store(ps_ptr + at, best_s)
    tl.store(pn_ptr + at, best_n)


@triton.jit
def _choice_merge_kernel(pt_ptr, ps_ptr, pn_ptr, free_ptr, NB, CHUNK: tl.constexpr):
    bh = tl.program_id(0)
    base = bh.to(tl.int64) * NB
    best_t = float("inf")
    best_s = 2147483647
    best_n = 0  # no eligible slot anywhere: slot 0, as the reference's argmin of all-max stamps
    for start in range(0, NB, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        inside = offs < NB
        s = tl.load(ps_ptr + base + offs, mask=inside, other=_NO_STAMP)
        t = tl.load(pt_ptr + base + offs, mask=inside, other=float("inf"))
        has = s != _NO_STAMP
        t = tl.where(has, t, _INF)
        t_min = tl.min(t, 0)
        tied = has & (t == t_min)
        s_min = tl.min(tl.where(tied, s, _NO_STAMP), 0)
        n_min = tl.min(tl.where(tied & (s == s_min), tl.load(pn_ptr + base + offs, mask=inside, other=0),
                                _NO_STAMP), 0)
        # lexicographic (total, stamp): a chunk wins on a lower total, or an equal one and an older stamp
        better = (s_min != _NO_STAMP) & ((t_min < best_t) | ((t_min == best_t) & (s_min < best_s)))
        best_t = tl.where(better, t_min, best_t)
        best_s = tl.where(better, s_min, best_s)
        best_n = tl.where(better, n_min, best_n)
    tl.store(free_ptr + bh, best_n.to(tl.int64))


def block_size(d: int) -> int:
    """Slots per program: BLOCK x D float32 keys in registers stays at 8K elements."""
    return max(16, 8192 // d)


DOT_BLOCK, DOT_CHUNK = 64, 512  # slots per product, slots per program (8 products, pipelined)


def mass_and_choice_triton(query, keys, lengths, real, lse, totals, scaling, choice=None, dot: bool = True) -> None:
    """MASS always when query is not None; CHOOSE when choice = (stamp, newest, recent, free).
    dot: the MASS step on `_mass_dot_kernel` (tensor-core products, chunks of slots per
    program); False: the first kernel (one block of slots per program, float32 dots)."""
    b, hkv, n, d = totals.shape[0], totals.shape[1], totals.shape[2], (keys.shape[-1] if keys is not None else 16)
    mass = query is not None
    dot = dot and mass
    blk = DOT_CHUNK if dot else block_size(d)
    nb = triton.cdiv(n, blk)
    real_u8 = real.view(torch.uint8)  # a reinterpretation: no copy, no launch
    srh = real_u8.stride(1) if real_u8.dim() == 3 else 0
    dummy = totals
    if mass:
        r = query.shape[1] // hkv
        q_args = (query, query.stride(0), query.stride(1), lse, lse.stride(0), lse.stride(1),
                  keys, keys.stride(0), keys.stride(1), keys.stride(2))
    else:
        r = 1
        q_args = (dummy, 0, 0, dummy, 0, 0, dummy, 0, 0, 0)
    if choice is not None:
        stamp, newest, recent, free = choice
        partial_t = torch.empty(b * hkv * nb, dtype=torch.float32, device=totals.device)
        partial_s = torch.empty(b * hkv * nb, dtype=torch.int32, device=totals.device)
        partial_n = torch.empty(b * hkv * nb, dtype=torch.int32, device=totals.device)
        c_args = (stamp, stamp.stride(0), stamp.stride(1), newest, recent, partial_t, partial_s, partial_n)
    else:
        c_args = (dummy, 0, 0, lengths, lengths, dummy, dummy, dummy)
    if dot:
        _mass_dot_kernel[(nb, b * hkv)](
            *q_args, lengths, lengths.numel() - 1, real_u8, real_u8.stride(0), srh,
            totals, totals.stride(0), totals.stride(1), *c_args, hkv, n, nb, scaling * _LOG2E,
            R=r, RP=max(16, triton.next_power_of_2(r)), D=d, BLOCK=DOT_BLOCK, CHUNK=DOT_CHUNK,
            CHOOSE=choice is not None, IEEE=query.dtype == torch.float32 or (query.dtype == torch.bfloat16
                                                                         and interpreter_enabled()),
            num_warps=4, num_stages=3)
    else:
        _mass_kernel[(nb, b * hkv)](
            *q_args, lengths, lengths.numel() - 1, real_u8, real_u8.stride(0), srh,
            totals, totals.stride(0), totals.stride(1), *c_args, hkv, n, nb, scaling * _LOG2E,
            R=r, D=d, BLOCK=blk, MASS=mass, CHOOSE=choice is not None, num_warps=4)
    if choice is not None:
        _choice_merge_kernel[(b * hkv,)](partial_t, partial_s, partial_n, free, nb, CHUNK=MERGE_CHUNK, num_warps=4)


SCORES_BLOCK, SCORES_CHUNK = 128, 1024  # slots per tile, slots per program


def scores_mass_and_choice_triton(scores, lengths, real, lse, totals, stamp, newest, recent, free) -> None:
    """attention_mass_from_scores' kernel path: `_scores_mass_kernel`, then the merge."""
    b, hkv, n = totals.shape
    r = scores.shape[1] // hkv
    nb = triton.cdiv(n, SCORES_CHUNK)
    real_u8 = real.view(torch.uint8)
    srh = real_u8.stride(1) if real_u8.dim() == 3 else 0
    partial_t = torch.empty(b * hkv * nb, dtype=torch.float32, device=totals.device)
    partial_s = torch.empty(b * hkv * nb, dtype=torch.int32, device=totals.device)
    partial_n = torch.empty(b * hkv * nb, dtype=torch.int32, device=totals.device)
    _scores_mass_kernel[(nb, b * hkv)](
        scores, scores.stride(0), scores.stride(1), lse, lse.stride(0), lse.stride(1), lengths, lengths.numel() - 1,
        real_u8, real_u8.stride(0), srh, totals, totals.stride(0), totals.stride(1),
        stamp, stamp.stride(0), stamp.stride(1), newest, recent, partial_t, partial_s, partial_n, hkv, n, nb,
        R=r, RP=triton.next_power_of_2(r), BLOCK=SCORES_BLOCK, CHUNK=SCORES_CHUNK, num_warps=4, num_stages=3)
    _choice_merge_kernel[(b * hkv,)](partial_t, partial_s, partial_n, free, nb, CHUNK=MERGE_CHUNK, num_warps=4)
