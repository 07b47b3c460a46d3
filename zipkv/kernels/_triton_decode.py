"""Triton split-K decode attention over packed tiers + the fp16 part (flash-decoding), v5/v6.

v6 (constexpr DQ, tuning `dequant`): the codes are dequantized to fp16 in registers before the
dots (q @ k^T, p @ v) instead of folding the scales into q and p; the default picks it per
launch for tiers with >= block_n tokens per key group (experiments/NOTES.md, "v6").

One launch: program (s, b*Hkv + h) takes one split (a contiguous token range) of one tier of
one KV head and all its R*Tq query rows (GQA: the R query heads of that KV head share every
byte read). Up to two packed tiers and the fp16 part go in one launch (program ranges
[0, S0) -> tier 0, [S0, S0+S1) -> tier 1, the rest -> fp16), each range a separate
constexpr-specialized code path (key bits, value bits, value group, channel factors); more
tiers take more launches. Each program writes its normalized partial output and
log2-sum-exp; a second small launch merges the splits.

Why the packed path never dequantizes keys: with channelwise keys, q . k = sum_c (q_c s_c)
code_c + sum_c q_c m_c for the token's key group, so the codes go straight into a tensor-core
dot against q*s (one [M, W] x [W, BLOCK_N] product per plane), plus one scalar per row.
Values likewise: p @ (code * s_n + m_n) = (p * s_n) @ code + sum_n p_n m_n per value group,
times the chunk's channel factors. Codes are exact in fp16 (0..255).
Plane layout: plane p of a row is (bytes >> p*bits) & mask and holds the contiguous channels
[p*W, (p+1)*W), W = D*bits/8: each plane is one contiguous slice of q (keys) or of the
output (values, in units of WU = min(W, value_group) channels with one scale each).
Keys and values of a tier have their own widths (the zipkv preset: 4-bit keys, 2-bit
values): keys KBITS (P = 8/KBITS planes of W = D*KBITS/8 channels), values VBITS (planes of
WV = D*VBITS/8 channels, WU = min(WV, value_group), CPP = WV/WU units per plane). Both are
constexpr, so with KBITS == VBITS the code is the single-width kernel's.
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

from .packed import PackedSegment, with_int32_indices

LOG2E = 1.4426950408889634
_NEG_INF = tl.constexpr(float("-inf"))


def _unpack_asm(bits: int, plane: int) -> str:
    """PTX for 4 packed bytes -> 4 fp16 codes of one plane: shift, mask, then the magic-number
    conversion (0x64XX as fp16 is 1024 + XX; subtracting 1024 is exact), 1.5 instructions per
    code instead of a shift, a mask and a cvt for every code."""
    mask = {2: "0x03030303", 4: "0x0F0F0F0F", 8: "0xFFFFFFFF"}[bits]
    pick = "mov.b32 t, $2;" if bits == 8 else f"shr.u32 t, $2, {plane * bits}; and.b32 t, t, {mask};"
    return ("{ .reg .b32 t, hi, k; " + pick + " mov.b32 hi, 0x64646464; mov.b32 k, 0x64006400; "
            "prmt.b32 $0, t, hi, 0x5140; prmt.b32 $1, t, hi, 0x7362; "
            "sub.f16x2 $0, $0, k; sub.f16x2 $1, $1, k; }")


_ASM_2_0 = tl.constexpr(_unpack_asm(2, 0))
_ASM_2_1 = tl.constexpr(_unpack_asm(2, 1))
_ASM_2_2 = tl.constexpr(_unpack_asm(2, 2))
_ASM_2_3 = tl.constexpr(_unpack_asm(2, 3))
_ASM_4_0 = tl.constexpr(_unpack_asm(4, 0))
_ASM_4_1 = tl.constexpr(_unpack_asm(4, 1))
_ASM_8_0 = tl.constexpr(_unpack_asm(8, 0))


@triton.jit
def _asm_codes(x, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _unpack(x, p: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """Plane p of packed bytes x as fp16 codes (exact)."""
    if USE_ASM:
        if BITS == 8:
            r = _asm_codes(x, _ASM_8_0)
        elif BITS == 4:
            if p == 0:
                r = _asm_codes(x, _ASM_4_0)
            else:
                r = _asm_codes(x, _ASM_4_1)
        else:
            if p == 0:
                r = _asm_codes(x, _ASM_2_0)
            elif p == 1:
                r = _asm_codes(x, _ASM_2_1)
            elif p == 2:
                r = _asm_codes(x, _ASM_2_2)
            else:
                r = _asm_codes(x, _ASM_2_3)
    else:
        r = ((x >> (p * BITS)) & (2 ** BITS - 1)).to(tl.float16)
    return r


@triton.jit
def _pick(i: tl.constexpr, a0, a1, a2, a3):
    r = a0
    if i == 1:
        r = a1
    if i == 2:
        r = a2
    if i == 3:
        r = a3
    return r


@triton.jit
def _masked_scores(s, offs_n, valid_n, t, row_valid, b, key_offset, nt_total,
                   mask_ptr, smb, smt, smn,
                   TQ: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores (log2 units) with padding, user mask and causal limit applied."""
    kg = key_offset + offs_n  # position in the concatenated key order
    s = tl.where(valid_n[None, :], s, _NEG_INF)
    if MASK_KIND != 0:
        if MASK_ROWS:
            mp = mask_ptr + b * smb + t[:, None] * smt + kg[None, :] * smn
            mv = tl.load(mp, mask=row_valid[:, None] & valid_n[None, :], other=0)
        else:
            mv = tl.load(mask_ptr + b * smb + kg * smn, mask=valid_n, other=0)[None, :]
        if MASK_KIND == 1:
            s = tl.where(mv != 0, s, _NEG_INF)
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if CAUSAL:
        s = tl.where(kg[None, :] <= (nt_total - TQ + t)[:, None], s, _NEG_INF)
    return s


@triton.jit
def _online_softmax(s, m_i, l_i):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)  # all masked so far: keep p = 0, no NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _key_dq(kb, p: tl.constexpr, srow, mrow, offs_w, BITS: tl.constexpr, W: tl.constexpr, USE_ASM: tl.constexpr):
    """v6: plane p of the block's keys dequantized in fp16, code * s + m ([BLOCK_N, W])."""
    sc = tl.load(srow + p * W + offs_w).to(tl.float16)
    mn = tl.load(mrow + p * W + offs_w).to(tl.float16)
    return _unpack(kb, p, BITS, USE_ASM) * sc[None, :] + mn[None, :]


@triton.jit
def _key_scores_dq(q0, q1, q2, q3, kb, srow, mrow, offs_w,
                   BITS: tl.constexpr, W: tl.constexpr, USE_ASM: tl.constexpr):
    """v6 (DQ): q (fp16, loop-invariant: its dot-operand copy is made once) @ dequantized keys^T,
    one dot per plane; no per-block q * s operand and no q . m reduction."""
    P: tl.constexpr = 8 // BITS
    s = tl.dot(q0, tl.trans(_key_dq(kb, 0, srow, mrow, offs_w, BITS, W, USE_ASM)))
    if P > 1:
        s = tl.dot(q1, tl.trans(_key_dq(kb, 1, srow, mrow, offs_w, BITS, W, USE_ASM)), s)
    if P > 2:
        s = tl.dot(q2, tl.trans(_key_dq(kb, 2, srow, mrow, offs_w, BITS, W, USE_ASM)), s)
        s = tl.dot(q3, tl.trans(_key_dq(kb, 3, srow, mrow, offs_w, BITS, W, USE_ASM)), s)
    return s


@triton.jit
def _key_scores(q0, q1, q2, q3, kb, srow, mrow, offs_w,
                BITS: tl.constexpr, W: tl.constexpr, USE_ASM: tl.constexpr):
    """Scores of a block whose tokens all lie in one key group (scale row srow, min row mrow):
    per plane (q_p * s_p) @ codes_p^T, plus q . m (one scalar per row)."""
    P: tl.constexpr = 8 // BITS
    sc = tl.load(srow + offs_w).to(tl.float32)
    mn = tl.load(mrow + offs_w).to(tl.float32)
    s = tl.dot((q0 * sc[None, :]).to(tl.float16), tl.trans(_unpack(kb, 0, BITS, USE_ASM)))
    qm = tl.sum(q0 * mn[None, :], 1)
    if P > 1:
        sc = tl.load(srow + W + offs_w).to(tl.float32)
        mn = tl.load(mrow + W + offs_w).to(tl.float32)
        s = tl.dot((q1 * sc[None, :]).to(tl.float16), tl.trans(_unpack(kb, 1, BITS, USE_ASM)), s)
        qm += tl.sum(q1 * mn[None, :], 1)
    if P > 2:
        sc = tl.load(srow + 2 * W + offs_w).to(tl.float32)
        mn = tl.load(mrow + 2 * W + offs_w).to(tl.float32)
        s = tl.dot((q2 * sc[None, :]).to(tl.float16), tl.trans(_unpack(kb, 2, BITS, USE_ASM)), s)
        qm += tl.sum(q2 * mn[None, :], 1)
        sc = tl.load(srow + 3 * W + offs_w).to(tl.float32)
        mn = tl.load(mrow + 3 * W + offs_w).to(tl.float32)
        s = tl.dot((q3 * sc[None, :]).to(tl.float16), tl.trans(_unpack(kb, 3, BITS, USE_ASM)), s)
        qm += tl.sum(q3 * mn[None, :], 1)
    return s + qm[:, None]


@triton.jit
def _group_scores(q0, q1, q2, q3, kb, srow, mrow, offs_w,
                  BITS: tl.constexpr, W: tl.constexpr, USE_ASM: tl.constexpr, DQ: tl.constexpr):
    """Scores of the block's tokens against one key group's scale/min rows: v6 (DQ) or v5."""
    if DQ:
        s = _key_scores_dq(q0, q1, q2, q3, kb, srow, mrow, offs_w, BITS, W, USE_ASM)
    else:
        s = _key_scores(q0, q1, q2, q3, kb, srow, mrow, offs_w, BITS, W, USE_ASM)
    return s


@triton.jit
def _v_unit(acc, u: tl.constexpr, p, vb, offs_n, valid_n, offs_wu, vs_base, vm_base, svs_n, frow,
            BITS: tl.constexpr, WU: tl.constexpr, VG: tl.constexpr, CPP: tl.constexpr, USE_ASM: tl.constexpr,
            SCALE_F: tl.constexpr, DQ: tl.constexpr):
    """acc += p @ values of unit u (channels [u*WU, (u+1)*WU): one plane slice, one value group):
    (p * s_n) @ codes + p . m_n, times the chunk's channel-factor row frow (SCALE_F).
    DQ (v6): p is already fp16 (one dot operand for all units) and the codes are dequantized
    in fp16 (code * s_n + m_n) before the dot: no per-unit p * s operand, no p . m reduction."""
    code = _unpack(vb, u // CPP, BITS, USE_ASM)
    if DQ:
        vs = tl.load(vs_base + offs_n * svs_n + (u * WU) // VG, mask=valid_n, other=0.0).to(tl.float16)
        vm = tl.load(vm_base + offs_n * svs_n + (u * WU) // VG, mask=valid_n, other=0.0).to(tl.float16)
        contrib = tl.dot(p, code * vs[:, None] + vm[:, None])
    else:
        vs = tl.load(vs_base + offs_n * svs_n + (u * WU) // VG, mask=valid_n, other=0.0).to(tl.float32)
        vm = tl.load(vm_base + offs_n * svs_n + (u * WU) // VG, mask=valid_n, other=0.0).to(tl.float32)
        contrib = tl.dot((p * vs[None, :]).to(tl.float16), code)
        contrib += tl.sum(p * vm[None, :], 1)[:, None]
    if SCALE_F:
        contrib = contrib * tl.load(frow + u * WU + offs_wu).to(tl.float32)[None, :]
    return acc + contrib


@triton.jit
def _v_update(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, p, vb0, vb1, vb2, vb3,
              offs_n, valid_n, offs_wu, vs_base, vm_base, svs_n, frow,
              BITS: tl.constexpr, WU: tl.constexpr, VG: tl.constexpr, U: tl.constexpr, CPP: tl.constexpr,
              USE_ASM: tl.constexpr, SCALE_F: tl.constexpr, DQ: tl.constexpr):
    acc0 = _v_unit(acc0, 0, p, _pick(0 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                   svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
    if U > 1:
        acc1 = _v_unit(acc1, 1, p, _pick(1 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                       svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
    if U > 2:
        acc2 = _v_unit(acc2, 2, p, _pick(2 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                       svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
        acc3 = _v_unit(acc3, 3, p, _pick(3 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                       svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
    if U > 4:
        acc4 = _v_unit(acc4, 4, p, _pick(4 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                       svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
        acc5 = _v_unit(acc5, 5, p, _pick(5 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                       svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
        acc6 = _v_unit(acc6, 6, p, _pick(6 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                       svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
        acc7 = _v_unit(acc7, 7, p, _pick(7 % CPP, vb0, vb1, vb2, vb3), offs_n, valid_n, offs_wu, vs_base, vm_base,
                       svs_n, frow, BITS, WU, VG, CPP, USE_ASM, SCALE_F, DQ)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _scale_accs(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, alpha, U: tl.constexpr):
    a = alpha[:, None]
    acc0 = acc0 * a
    if U > 1:
        acc1 = acc1 * a
    if U > 2:
        acc2 = acc2 * a
        acc3 = acc3 * a
    if U > 4:
        acc4 = acc4 * a
        acc5 = acc5 * a
        acc6 = acc6 * a
        acc7 = acc7 * a
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _store_unit(acc, u: tl.constexpr, prow, offs_wu, l_safe, row_valid, WU: tl.constexpr):
    tl.store(prow[:, None] + u * WU + offs_wu[None, :], acc / l_safe[:, None], mask=row_valid[:, None])


@triton.jit
def _packed_split(
    q_ptr, sqb, sqh, sqt, qk_scale,
    kc_ptr, skc_b, skc_h, skc_n, ks_ptr, km_ptr, sks_b, sks_h, sks_g, tg_ptr,
    vc_ptr, svc_b, svc_h, svc_n, vs_ptr, vm_ptr, svs_b, svs_h, svs_n,
    vch_ptr, svch_b, svch_h, svch_c, tc_ptr,
    mask_ptr, smb, smt, smn, po_ptr, pl_ptr,
    b, h, split, part, N, tokens_per_split, key_offset, nt_total, H, S_total,
    R: tl.constexpr, TQ: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    KBITS: tl.constexpr, VBITS: tl.constexpr, VG: tl.constexpr, WU: tl.constexpr, HAS_VCH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, CAUSAL: tl.constexpr, USE_ASM: tl.constexpr,
    DQ: tl.constexpr = False,
):
    """One split of one packed tier (KBITS, VBITS constexpr: no branching over tiers in the loop).
    Rows of the [M, BLOCK_N] score tile are the R*TQ query rows (padded to M >= 16).
    Keys: a block inside one key group costs one dot per plane against q * s; a block that
    straddles groups repeats it per group (selected per token). Values: one dot per unit
    against p * s_n; a block that straddles channel-factor chunks repeats it per chunk."""
    P: tl.constexpr = 8 // KBITS  # key planes
    W: tl.constexpr = D * KBITS // 8  # key row bytes = channels per key plane
    WV: tl.constexpr = D * VBITS // 8  # value row bytes = channels per value plane
    U: tl.constexpr = D // WU  # value units (WU channels inside one plane and one value group)
    CPP: tl.constexpr = WV // WU  # value units per plane
    RT: tl.constexpr = R * TQ
    offs_m = tl.arange(0, M)
    row_valid = offs_m < RT
    row_r = offs_m % RT
    t = row_r % TQ
    q_row = q_ptr + b * sqb + (h * R + row_r // TQ) * sqh + t * sqt
    offs_w = tl.arange(0, W)
    qmask = row_valid[:, None]
    q0 = tl.load(q_row[:, None] + offs_w[None, :], mask=qmask, other=0.0).to(tl.float32) * qk_scale
    q1 = q0
    q2 = q0
    q3 = q0
    if P > 1:
        q1 = tl.load(q_row[:, None] + W + offs_w[None, :], mask=qmask, other=0.0).to(tl.float32) * qk_scale
    if P > 2:
        q2 = tl.load(q_row[:, None] + 2 * W + offs_w[None, :], mask=qmask, other=0.0).to(tl.float32) * qk_scale
        q3 = tl.load(q_row[:, None] + 3 * W + offs_w[None, :], mask=qmask, other=0.0).to(tl.float32) * qk_scale
    if DQ:  # v6: q is a loop-invariant fp16 dot operand
        q0 = q0.to(tl.float16)
        q1 = q1.to(tl.float16)
        q2 = q2.to(tl.float16)
        q3 = q3.to(tl.float16)

    offs_wu = tl.arange(0, WU)
    m_i = tl.full([M], _NEG_INF, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc0 = tl.zeros([M, WU], tl.float32)
    acc1 = tl.zeros([M, WU], tl.float32)
    acc2 = tl.zeros([M, WU], tl.float32)
    acc3 = tl.zeros([M, WU], tl.float32)
    acc4 = tl.zeros([M, WU], tl.float32)
    acc5 = tl.zeros([M, WU], tl.float32)
    acc6 = tl.zeros([M, WU], tl.float32)
    acc7 = tl.zeros([M, WU], tl.float32)

    k_base = kc_ptr + b * skc_b + h * skc_h
    ks_base = ks_ptr + b * sks_b + h * sks_h
    km_base = km_ptr + b * sks_b + h * sks_h
    v_base = vc_ptr + b * svc_b + h * svc_h
    vs_base = vs_ptr + b * svs_b + h * svs_h
    vm_base = vm_ptr + b * svs_b + h * svs_h
    vch_base = vch_ptr + b * svch_b + h * svch_h
    n_begin = split * tokens_per_split
    n_end = tl.minimum(n_begin + tokens_per_split, N)
    offs_b = tl.arange(0, BLOCK_N)

    for start in range(n_begin, n_end, BLOCK_N):
        offs_n = start + offs_b
        valid_n = offs_n < n_end
        vm2 = valid_n[:, None]
        grp = tl.load(tg_ptr + offs_n, mask=valid_n, other=0)
        kb = tl.load(k_base + offs_n[:, None] * skc_n + offs_w[None, :], mask=vm2, other=0)
        vrow = v_base + offs_n[:, None] * svc_n + offs_wu[None, :]
        vb0 = tl.load(vrow, mask=vm2, other=0)
        vb1 = vb0
        vb2 = vb0
        vb3 = vb0
        if CPP > 1:
            vb1 = tl.load(vrow + WU, mask=vm2, other=0)
        if CPP > 2:
            vb2 = tl.load(vrow + 2 * WU, mask=vm2, other=0)
            vb3 = tl.load(vrow + 3 * WU, mask=vm2, other=0)

        # ---- keys: one dot per plane for the block's first key group; a block that straddles
        # groups loops over the others (selecting per token), at the same register cost.
        g_lo = tl.min(tl.where(valid_n, grp, 2147483647), 0)
        g_hi = tl.max(tl.where(valid_n, grp, -1), 0)
        s = _group_scores(q0, q1, q2, q3, kb, ks_base + g_lo * sks_g, km_base + g_lo * sks_g, offs_w,
                          KBITS, W, USE_ASM, DQ)
        if g_hi > g_lo:
            for g in range(g_lo + 1, g_hi + 1):
                s2 = _group_scores(q0, q1, q2, q3, kb, ks_base + g * sks_g, km_base + g * sks_g, offs_w,
                                   KBITS, W, USE_ASM, DQ)
                s = tl.where((grp == g)[None, :], s2, s)
        s = _masked_scores(s, offs_n, valid_n, t, row_valid, b, key_offset, nt_total,
                           mask_ptr, smb, smt, smn, TQ, MASK_KIND, MASK_ROWS, CAUSAL)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        if DQ:
            pv = p.to(tl.float16)
        else:
            pv = p
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _scale_accs(
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, alpha, U)

        # ---- values: channel factors are per chunk of tokens; a block that straddles chunks
        # loops over them with p masked to each chunk's tokens.
        if HAS_VCH:
            ch = tl.load(tc_ptr + offs_n, mask=valid_n, other=0)
            c_lo = tl.min(tl.where(valid_n, ch, 2147483647), 0)
            c_hi = tl.max(tl.where(valid_n, ch, -1), 0)
            if c_lo == c_hi:
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _v_update(
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, pv, vb0, vb1, vb2, vb3,
                    offs_n, valid_n, offs_wu, vs_base, vm_base, svs_n, vch_base + c_lo * svch_c,
                    VBITS, WU, VG, U, CPP, USE_ASM, True, DQ)
            else:
                for c in range(c_lo, c_hi + 1):
                    pc = tl.where((ch == c)[None, :], p, 0.0)
                    if DQ:
                        pc = pc.to(tl.float16)
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _v_update(
                        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, pc,
                        vb0, vb1, vb2, vb3, offs_n, valid_n, offs_wu, vs_base, vm_base, svs_n,
                        vch_base + c * svch_c, VBITS, WU, VG, U, CPP, USE_ASM, True, DQ)
        else:
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _v_update(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, pv, vb0, vb1, vb2, vb3,
                offs_n, valid_n, offs_wu, vs_base, vm_base, svs_n, vch_base,
                VBITS, WU, VG, U, CPP, USE_ASM, False, DQ)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    row0 = ((b * H + h) * S_total + part) * RT
    tl.store(pl_ptr + row0 + offs_m, tl.where(l_i > 0, m_i + tl.log2(l_safe), _NEG_INF), mask=row_valid)
    prow = po_ptr + (row0 + offs_m) * D
    _store_unit(acc0, 0, prow, offs_wu, l_safe, row_valid, WU)
    if U > 1:
        _store_unit(acc1, 1, prow, offs_wu, l_safe, row_valid, WU)
    if U > 2:
        _store_unit(acc2, 2, prow, offs_wu, l_safe, row_valid, WU)
        _store_unit(acc3, 3, prow, offs_wu, l_safe, row_valid, WU)
    if U > 4:
        _store_unit(acc4, 4, prow, offs_wu, l_safe, row_valid, WU)
        _store_unit(acc5, 5, prow, offs_wu, l_safe, row_valid, WU)
        _store_unit(acc6, 6, prow, offs_wu, l_safe, row_valid, WU)
        _store_unit(acc7, 7, prow, offs_wu, l_safe, row_valid, WU)


@triton.jit
def _fp_split(
    q_ptr, sqb, sqh, sqt, qk_scale,
    k_ptr, sk_b, sk_h, sk_n, v_ptr, sv_b, sv_h, sv_n,
    mask_ptr, smb, smt, smn, po_ptr, pl_ptr,
    b, h, split, part, N, tokens_per_split, key_offset, nt_total, H, S_total,
    R: tl.constexpr, TQ: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, CAUSAL: tl.constexpr, F32_DOT: tl.constexpr,
    sc_ptr, ssc_b, ssc_h, STORE_S: tl.constexpr,
):
    """One split of the fp16 part: plain flash-decoding. STORE_S (Tq = 1): each query head's
    scaled scores of these keys, natural units (scale * q.k; -inf where masked), into
    sc_ptr [B, Hq, N] (H2O's bookkeeping reads them instead of the keys)."""
    RT: tl.constexpr = R * TQ
    offs_m = tl.arange(0, M)
    row_r = offs_m % RT
    row_valid = offs_m < RT
    t = row_r % TQ
    q_row = q_ptr + b * sqb + (h * R + row_r // TQ) * sqh + t * sqt
    offs_d = tl.arange(0, D)
    q = tl.load(q_row[:, None] + offs_d[None, :], mask=row_valid[:, None], other=0.0).to(tl.float32) * qk_scale
    if not F32_DOT:
        q = q.to(k_ptr.dtype.element_ty)
    m_i = tl.full([M], _NEG_INF, tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    n_begin = split * tokens_per_split
    n_end = tl.minimum(n_begin + tokens_per_split, N)
    offs_b = tl.arange(0, BLOCK_N)
    for start in range(n_begin, n_end, BLOCK_N):
        offs_n = start + offs_b
        valid_n = offs_n < n_end
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        if F32_DOT:  # Triton's CPU interpreter computes bf16 dots wrongly (seen with triton 3.9)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        s = _masked_scores(s, offs_n, valid_n, t, row_valid, b, key_offset, nt_total,
                           mask_ptr, smb, smt, smn, TQ, MASK_KIND, MASK_ROWS, CAUSAL)
        if STORE_S:
            sc_at = sc_ptr + b * ssc_b + (h * R + row_r)[:, None] * ssc_h + offs_n[None, :]
            tl.store(sc_at, s * 0.6931471805599453, mask=row_valid[:, None] & valid_n[None, :])
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    row0 = ((b * H + h) * S_total + part) * RT
    tl.store(pl_ptr + row0 + offs_m, tl.where(l_i > 0, m_i + tl.log2(l_safe), _NEG_INF), mask=row_valid)
    tl.store(po_ptr + (row0 + offs_m)[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=row_valid[:, None])


# Arguments that change from one decode step to the next and whose "% 16 == 0" / "== 1"
# specialization could flip while decoding (each flip compiles a new variant: seconds per
# step until every combination is cached): token counts, split sizes, offsets, the strides
# of tensors with one small row per token (value scales, the mask).
# The batch/head strides of the codes, key scales, channel factors and the fp16 part stay
# specialized: they are multiples of the row width (D * bits / 8 bytes or D elements, a
# multiple of 16 for every supported head_dim), so they never flip, and knowing them
# aligned lets the compiler issue 16-byte loads. Unspecialized (session 2), the kernel read
# its codes byte by byte and ran 2.2x slower in the model (0.80 vs 0.36 ms at 32K x 8).
_PER_STEP_ARGS = [
    "a_svs_b", "a_svs_h", "c_svs_b", "c_svs_h", "smb", "smh", "smt",
    "NA", "NC", "NF", "TSA", "TSC", "TSF", "SA", "SC", "OFFA", "OFFC", "OFFF", "part_base",
    "nt_total", "S_total",
]


@triton.jit(do_not_specialize=_PER_STEP_ARGS)
def _decode_kernel(
    q_ptr, sqb, sqh, sqt, qk_scale,
    a_kc, a_skc_b, a_skc_h, a_skc_n, a_ks, a_km, a_sks_b, a_sks_h, a_sks_g, a_tg,
    a_vc, a_svc_b, a_svc_h, a_svc_n, a_vs, a_vm, a_svs_b, a_svs_h, a_svs_n,
    a_vch, a_svch_b, a_svch_h, a_svch_c, a_tc,
    c_kc, c_skc_b, c_skc_h, c_skc_n, c_ks, c_km, c_sks_b, c_sks_h, c_sks_g, c_tg,
    c_vc, c_svc_b, c_svc_h, c_svc_n, c_vs, c_vm, c_svs_b, c_svs_h, c_svs_n,
    c_vch, c_svch_b, c_svch_h, c_svch_c, c_tc,
    f_k, f_sk_b, f_sk_h, f_sk_n, f_v, f_sv_b, f_sv_h, f_sv_n,
    mask_ptr, smb, smh, smt, smn, po_ptr, pl_ptr,
    NA, NC, NF, TSA, TSC, TSF, SA, SC, OFFA, OFFC, OFFF, part_base, nt_total, H, S_total,
    na_ptr, nc_ptr, nf_ptr,
    R: tl.constexpr, TQ: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    HAS_A: tl.constexpr, KBITS_A: tl.constexpr, VBITS_A: tl.constexpr, VG_A: tl.constexpr, WU_A: tl.constexpr,
    VCH_A: tl.constexpr,
    HAS_C: tl.constexpr, KBITS_C: tl.constexpr, VBITS_C: tl.constexpr, VG_C: tl.constexpr, WU_C: tl.constexpr,
    VCH_C: tl.constexpr,
    HAS_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NF: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, CAUSAL: tl.constexpr, F32_DOT: tl.constexpr,
    USE_ASM: tl.constexpr, LENS_ON_DEVICE: tl.constexpr, DQ: tl.constexpr = False,
    sc_ptr=None, ssc_b=0, ssc_h=0, STORE_S: tl.constexpr = False,
):
    sid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # a per-head mask [B, Hkv, Tq, Nt]: this KV head's rows (smh = 0: one mask for every head)
    mask_ptr += h * smh
    if LENS_ON_DEVICE:
        # Preallocated buffers (CUDA graphs): the grid and splits cover their capacity, the
        # counts of valid tokens come from device memory; splits past them read nothing.
        NA = tl.load(na_ptr)
        NC = tl.load(nc_ptr)
        NF = tl.load(nf_ptr)
    if sid < SA:
        if HAS_A:
            _packed_split(q_ptr, sqb, sqh, sqt, qk_scale,
                          a_kc, a_skc_b, a_skc_h, a_skc_n, a_ks, a_km, a_sks_b, a_sks_h, a_sks_g, a_tg,
                          a_vc, a_svc_b, a_svc_h, a_svc_n, a_vs, a_vm, a_svs_b, a_svs_h, a_svs_n,
                          a_vch, a_svch_b, a_svch_h, a_svch_c, a_tc,
                          mask_ptr, smb, smt, smn, po_ptr, pl_ptr,
                          b, h, sid, part_base + sid, NA, TSA, OFFA, nt_total, H, S_total,
                          R, TQ, M, D, KBITS_A, VBITS_A, VG_A, WU_A, VCH_A, BLOCK_N,
                          MASK_KIND, MASK_ROWS, CAUSAL, USE_ASM, DQ)
    elif sid < SA + SC:
        if HAS_C:
            _packed_split(q_ptr, sqb, sqh, sqt, qk_scale,
                          c_kc, c_skc_b, c_skc_h, c_skc_n, c_ks, c_km, c_sks_b, c_sks_h, c_sks_g, c_tg,
                          c_vc, c_svc_b, c_svc_h, c_svc_n, c_vs, c_vm, c_svs_b, c_svs_h, c_svs_n,
                          c_vch, c_svch_b, c_svch_h, c_svch_c, c_tc,
                          mask_ptr, smb, smt, smn, po_ptr, pl_ptr,
                          b, h, sid - SA, part_base + sid, NC, TSC, OFFC, nt_total, H, S_total,
                          R, TQ, M, D, KBITS_C, VBITS_C, VG_C, WU_C, VCH_C, BLOCK_N,
                          MASK_KIND, MASK_ROWS, CAUSAL, USE_ASM, DQ)
    else:
        if HAS_F:
            _fp_split(q_ptr, sqb, sqh, sqt, qk_scale,
                      f_k, f_sk_b, f_sk_h, f_sk_n, f_v, f_sv_b, f_sv_h, f_sv_n,
                      mask_ptr, smb, smt, smn, po_ptr, pl_ptr,
                      b, h, sid - SA - SC, part_base + sid, NF, TSF, OFFF, nt_total, H, S_total,
                      R, TQ, M, D, BLOCK_NF, MASK_KIND, MASK_ROWS, CAUSAL, F32_DOT,
                      sc_ptr, ssc_b, ssc_h, STORE_S)


@triton.jit(do_not_specialize=["E"])
def _merge_kernel(po_ptr, pl_ptr, out_ptr, lse_ptr, sob, soh, sot, E, H,
                  R: tl.constexpr, TQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                  STORE_LSE: tl.constexpr = False):
    """out row = log-sum-exp merge of its E partials (one per split); STORE_LSE: the row's
    log-sum-exp of the scaled scores (natural log) into lse_ptr [B, Hq, TQ]."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // H
    h = bh % H
    RT: tl.constexpr = R * TQ
    offs_d = tl.arange(0, D)
    m_run = float("-inf")
    l_run = 0.0
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, E, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = offs_s < E
        idx = (bh * E + offs_s) * RT + row
        lse = tl.load(pl_ptr + idx, mask=valid, other=_NEG_INF)
        m_new = tl.maximum(m_run, tl.max(lse, 0))
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        w = tl.exp2(lse - m_safe)
        o = tl.load(po_ptr + idx[:, None] * D + offs_d[None, :], mask=valid[:, None] & (lse > _NEG_INF)[:, None], other=0.0)
        scale = tl.exp2(m_run - m_safe)
        acc = acc * scale + tl.sum(w[:, None] * o, 0)
        l_run = l_run * scale + tl.sum(w, 0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    head = h * R + row // TQ
    tl.store(out_ptr + b * sob + head * soh + (row % TQ) * sot + offs_d, out.to(out_ptr.dtype.element_ty))
    if STORE_LSE:  # partials are in log2 units of the scaled scores
        lse2 = tl.where(l_run > 0, m_run + tl.log2(tl.where(l_run > 0, l_run, 1.0)), _NEG_INF)
        tl.store(lse_ptr + (b * H * R + head) * TQ + row % TQ, lse2 * 0.6931471805599453)


# ----------------------------------------------------------------------------- host side

def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def unit_width(seg: PackedSegment, head_dim: int) -> int:
    """Channels of one value unit: one value plane's slice inside one value group."""
    return min(head_dim * seg.value_bits // 8, seg.value_group)


def supported(query, segs) -> str | None:
    """None when the Triton path handles these shapes, else the reason (callers fall back)."""
    d = query.shape[-1]
    if d not in (32, 64, 128, 256):
        return f"head_dim {d} is not a power of two in 32..256"
    for s in segs:
        w = d * s.bits // 8
        wv = d * s.value_bits // 8
        wu = unit_width(s, d)
        if w < 16:
            return f"{s.bits}-bit key rows of {w} bytes are too narrow for tensor-core dots (need >= 16)"
        if wu < 16 or (wv // wu) > 4 or d // wu > 8 or s.value_group % wu:
            return (f"value_group {s.value_group} with {s.value_bits}-bit value codes needs unit width >= 16 "
                    "and <= 8 units")
        for name in ("k_codes", "v_codes", "k_scale", "k_min", "v_scale", "v_min", "v_channel"):
            t = getattr(s, name)
            if t is not None and t.stride(-1) != 1:
                return f"{name} must have a unit last stride"
        if s.k_scale.stride() != s.k_min.stride() or s.v_scale.stride() != s.v_min.stride():
            return "scale and min must share strides"
    return None


def _seg_args(seg: PackedSegment | None, dummy: torch.Tensor):
    if seg is None:
        z = [dummy, 0, 0, 0, dummy, dummy, 0, 0, 0, dummy, dummy, 0, 0, 0, dummy, dummy, 0, 0, 0, dummy, 0, 0, 0, dummy]
        return z
    vch = seg.v_channel if seg.v_channel is not None else dummy
    tc = seg.token_chunk if seg.token_chunk is not None else dummy
    vs = (vch.stride(0), vch.stride(1), vch.stride(2)) if seg.v_channel is not None else (0, 0, 0)
    return [seg.k_codes, *seg.k_codes.stride()[:3], seg.k_scale, seg.k_min, *seg.k_scale.stride()[:3], seg.token_group,
            seg.v_codes, *seg.v_codes.stride()[:3], seg.v_scale, seg.v_min, *seg.v_scale.stride()[:3],
            vch, *vs, tc]


def _seg_consts(seg: PackedSegment | None, d: int):
    if seg is None:
        return dict(has=False, kbits=2, vbits=2, vg=d, wu=16, vch=False)
    return dict(has=True, kbits=seg.bits, vbits=seg.value_bits, vg=seg.value_group, wu=unit_width(seg, d),
                vch=seg.v_channel is not None)


def _bytes_per_token(seg: PackedSegment | None, d: int, fp_elem: int = 2) -> float:
    if seg is None:
        return 2 * d * fp_elem
    return d * (seg.bits + seg.value_bits) / 8 + 2 * seg.v_scale.element_size() * seg.v_scale.shape[-1]


def triton_decode_attention(query, segs, k_fp, v_fp, mask4, mask_kind, scale, causal,
                            block_n: int | None = None, block_n_fp: int = 64, num_warps: int = 4,
                            num_stages: int = 2, programs_per_sm: float = 32.0, maxnreg: int | None = 128,
                            use_asm: bool | None = None, tiers_per_launch: int = 2, lengths=None,
                            dequant: bool | None = None, cuda_tiers=None, mma_ctas_per_sm: float = 4.0,
                            mma_ring: int = 4, record: dict | None = None, return_lse: bool = False,
                            scores_out: torch.Tensor | None = None):
    """Defaults are the fastest measured on the H100 (experiments/NOTES.md, v5; experiments/results/v5.json).

    scores_out: None, or float32 [B, Hq, Nf] (Tq = 1): the fp16 part's scaled scores (scale *
    q.k, natural units, -inf where masked) written by the same pass that attends over them;
    slots past the fp16 part's count are not written.

    lengths: None, or int32 [len(segs) + 1] on the query's device: valid tokens of each tier
    and of the fp16 part, read by the kernel (the tensors are then capacity buffers and the
    launch depends on nothing that changes while decoding: CUDA-graph capturable).

    dequant (v6, experiments/NOTES.md): dequantize codes to fp16 in registers before the
    tensor-core dots (q @ k^T, p @ v) instead of folding the scales into the other operand
    (v5: (q*s) @ codes + q.m, (p*s) @ codes + p.m per value unit). None (default): v6 for a
    launch whose tiers average >= block_n tokens per key group (ZipCache, the zipkv preset:
    12-18% faster at 32K x 8 on the H100), v5 otherwise (KIVI's 32-token groups make v6 redo
    the key dequantization per group in each block: 2.5% slower there; experiments/results/v6.json).

    cuda_tiers (v7-v9, mma_decode.cu): None (every tier in Triton), or one entry per tier of
    `segs`: None (Triton reads it) or the (warps, blocks per SM) of the CUDA tensor-core kernel,
    which then reads that tier, one launch per tier, with mma_ring stages of each warp's
    cp.async copy ring in shared memory (v8) and about mma_ctas_per_sm blocks per SM in all;
    the fp16 part and the merge stay in Triton. Which tiers go where is decided by the caller
    (decode_attention.route_tiers), not here.

    record: None, or a dict the launches are described in: "mma" (one entry per CUDA launch:
    its compile-time defines and registers) and "triton" (one per Triton launch: registers,
    spills, grid, tiling, dequant)."""
    from ._runtime import sm_count
    from . import mma_decode

    b, hq, tq, d = query.shape
    heads = segs[0].k_codes.shape[1] if segs else k_fp.shape[1]
    r = hq // heads
    rt = r * tq
    m_rows = max(16, _pow2(rt))
    dev = query.device
    if lengths is None:
        seg_lens = [None] * len(segs)
    else:
        seg_lens = [lengths[i:i + 1] for i in range(len(segs))]
        fp_len = lengths[len(segs):len(segs) + 1]
    if cuda_tiers is None:
        cuda_tiers = [None] * len(segs)
    kept = [i for i, s in enumerate(segs) if s.num_tokens > 0]
    seg_lens = [seg_lens[i] for i in kept]
    cuda_tiers = [cuda_tiers[i] for i in kept]
    segs = [with_int32_indices(segs[i]) for i in kept]  # the kernel reads int32 indices
    nf = k_fp.shape[2] if k_fp is not None else 0
    if block_n is None:
        block_n = 64
    nt = sum(s.num_tokens for s in segs) + nf

    # Split sizes: about programs_per_sm * SMs programs in all, each reading about the same bytes.
    parts = [(s, s.num_tokens, _bytes_per_token(s, d)) for s in segs]
    if nf:
        parts.append((None, nf, _bytes_per_token(None, d, k_fp.element_size())))
    total = sum(n * w for _, n, w in parts) * b * heads
    per_prog = max(total / (programs_per_sm * sm_count(dev)), 1.0)
    per_cta = max(total / (mma_ctas_per_sm * sm_count(dev)), 1.0)
    mask_rows = mask4 is not None and mask4.shape[2] > 1
    plan = []  # (seg or None, n, tokens_per_split, splits, key_offset, (warps, blocks) for the CUDA kernel or None)
    offset = 0
    for i, (seg, n, w) in enumerate(parts):
        mma_cfg = cuda_tiers[i] if seg is not None else None
        if mma_cfg:  # whole waves of resident blocks per launch (one launch per tier)
            blk = mma_decode.TOKENS_PER_TILE * mma_cfg[0]
            wave = sm_count(dev) * mma_decode.blocks_per_sm(query, seg, mask4 is not None, lengths is not None,
                                                            *mma_cfg, mma_ring)
            waves = max(1, round(n * w * b * heads / per_cta / wave))
            splits = max(1, waves * wave // (b * heads))
            ts = -(-n // splits // blk) * blk if n >= splits * blk else blk
        else:
            blk, budget = (block_n if seg is not None else block_n_fp), per_prog
            ts = max(blk, int(-(-budget / w // blk)) * blk)
        ts = min(ts, -(-n // blk) * blk)
        plan.append((seg, n, ts, -(-n // ts), offset, mma_cfg))
        offset += n
    s_total = sum(p[3] for p in plan)
    po = torch.empty((b * heads, s_total, rt, d), device=dev, dtype=torch.float32)
    pl = torch.empty((b * heads, s_total, rt), device=dev, dtype=torch.float32)

    if mask4 is None:
        mask_t, smb, smh, smt, smn = query, 0, 0, 0, 0
    else:  # [B, 1 or Hkv, 1 or Tq, Nt]; a dimension of one is read with stride 0
        mask_t = mask4.view(torch.uint8) if mask_kind == 1 else mask4
        smb, smh, smt, smn = (0 if n == 1 else st for n, st in zip(mask_t.shape, mask_t.stride()))
    dummy = query
    qk_scale = scale * LOG2E

    part_base = 0
    for i, (seg, n, ts, splits, key_offset, mma_cfg) in enumerate(plan):
        if mma_cfg:
            mma_decode.launch(query, seg, None if mask4 is None else mask_t, smb, smn, po, pl, qk_scale=qk_scale,
                              tokens_per_split=ts, splits=splits, key_offset=key_offset, part_base=part_base,
                              s_total=s_total, n_dev=None if lengths is None else seg_lens[i], warps=mma_cfg[0],
                              min_blocks=mma_cfg[1], ring=mma_ring,
                              record=None if record is None else record.setdefault("mma", []))
            part_base += splits
    seg_lens = [n for p, n in zip(plan, seg_lens) if not p[5]]
    packed = [p for p in plan if p[0] is not None and not p[5]]
    fp_part = next((p for p in plan if p[0] is None), None)
    # One launch holds up to two tiers (its registers are the larger branch's); tiers_per_launch=1
    # gives each tier its own launch and register count.
    step = 2 if tiers_per_launch >= 2 else 1
    launches = [list(range(i, min(i + step, len(packed)))) for i in range(0, len(packed), step)] or [[]]
    for li, pair in enumerate(launches):
        a = packed[pair[0]] if len(pair) > 0 else None
        c = packed[pair[1]] if len(pair) > 1 else None
        f = fp_part if li == 0 else None
        if lengths is None:
            len_ptrs = (dummy, dummy, dummy)
        else:
            len_ptrs = tuple(seg_lens[pair[j]] if len(pair) > j else fp_len for j in (0, 1)) + (fp_len,)
        dq = dequant
        if dq is None:
            dq = all(p[0].num_tokens >= block_n * p[0].k_scale.shape[2] for p in (a, c) if p is not None)
        ca = _seg_consts(a[0] if a else None, d)
        cc = _seg_consts(c[0] if c else None, d)
        sa = a[3] if a else 0
        sc = c[3] if c else 0
        sf = f[3] if f else 0
        fk = k_fp if f else dummy
        fv = v_fp if f else dummy
        fks = fk.stride()[:3] if f else (0, 0, 0)
        fvs = fv.stride()[:3] if f else (0, 0, 0)
        grid = (sa + sc + sf, b * heads)
        if grid[0] == 0:
            continue
        store_s = f is not None and scores_out is not None
        sc_args = dict(sc_ptr=scores_out, ssc_b=scores_out.stride(0), ssc_h=scores_out.stride(1),
                       STORE_S=True) if store_s else {}
        kernel = _decode_kernel[grid](
            query, query.stride(0), query.stride(1), query.stride(2), qk_scale,
            *_seg_args(a[0] if a else None, dummy), *_seg_args(c[0] if c else None, dummy),
            fk, *fks, fv, *fvs,
            mask_t, smb, smh, smt, smn, po, pl,
            a[1] if a else 0, c[1] if c else 0, nf if f else 0,
            a[2] if a else 1, c[2] if c else 1, f[2] if f else 1,
            sa, sc, a[4] if a else 0, c[4] if c else 0, f[4] if f else 0,
            part_base, nt, heads, s_total, *len_ptrs,
            R=r, TQ=tq, M=m_rows, D=d,
            HAS_A=ca["has"], KBITS_A=ca["kbits"], VBITS_A=ca["vbits"], VG_A=ca["vg"], WU_A=ca["wu"],
            VCH_A=ca["vch"],
            HAS_C=cc["has"], KBITS_C=cc["kbits"], VBITS_C=cc["vbits"], VG_C=cc["vg"], WU_C=cc["wu"],
            VCH_C=cc["vch"],
            HAS_F=f is not None, BLOCK_N=block_n, BLOCK_NF=block_n_fp,
            MASK_KIND=mask_kind, MASK_ROWS=mask_rows, CAUSAL=bool(causal),
            F32_DOT=dev.type != "cuda" and k_fp is not None and k_fp.dtype == torch.bfloat16,
            USE_ASM=(dev.type == "cuda") if use_asm is None else bool(use_asm), LENS_ON_DEVICE=lengths is not None,
            DQ=bool(dq), **sc_args,
            num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
        )
        part_base += grid[0]
        if record is not None:
            record.setdefault("triton", []).append(dict(
                n_regs=getattr(kernel, "n_regs", None), n_spills=getattr(kernel, "n_spills", None), grid=list(grid),
                block_n=block_n, num_warps=num_warps, num_stages=num_stages, dequant=bool(dq)))

    out = torch.empty((b, hq, tq, d), device=dev, dtype=query.dtype)
    e = s_total
    lse = torch.empty((b, hq, tq), device=dev, dtype=torch.float32) if return_lse else out
    _merge_kernel[(b * heads, rt)](po, pl, out, lse, out.stride(0), out.stride(1), out.stride(2), e, heads,
                                   R=r, TQ=tq, D=d, BLOCK_S=min(64, _pow2(e)), STORE_LSE=return_lse, num_warps=4)
    return (out, lse) if return_lse else out
