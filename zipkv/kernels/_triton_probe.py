"""Triton probe-score kernels (ZipCache saliency, normalized attention score).

Two passes, no [P, T] probability matrix in memory:
1. per (batch, query head, block of probe rows): log-sum-exp of each probe row over the keys
   it may see (flash-style online max/sum; key blocks past the block's last probe are skipped);
2. per (batch, KV head, block of keys): sum over probe rows and the R query heads of the GQA
   group of exp(s - lse), and the count of probe rows that see each key.
Visibility: key j is seen by probe i iff j <= pos_i (causal) and key_mask[b, j].
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _probe_lse_kernel(q_ptr, sqb, sqh, sqp, k_ptr, skb, skh, skt, pos_ptr, km_ptr, smb, lse_ptr,
                      P, T, HQ, R, qk_scale,
                      D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                      HAS_KM: tl.constexpr, F32_DOT: tl.constexpr):
    pb = tl.program_id(0)
    bhq = tl.program_id(1)
    b = bhq // HQ
    hq = bhq % HQ
    h = hq // R
    rows = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    rv = rows < P
    pos = tl.load(pos_ptr + rows, mask=rv, other=-1)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + hq * sqh + rows[:, None] * sqp + offs_d[None, :], mask=rv[:, None], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_P], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_P], tl.float32)
    kb = k_ptr + b * skb + h * skh
    t_end = tl.minimum(tl.max(pos, 0) + 1, T)
    offs_t = tl.arange(0, BLOCK_T)
    for t0 in range(0, t_end, BLOCK_T):
        cols = t0 + offs_t
        cv = cols < T
        k = tl.load(kb + cols[:, None] * skt + offs_d[None, :], mask=cv[:, None], other=0.0)
        if F32_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        ok = (cols[None, :] <= pos[:, None]) & cv[None, :]
        if HAS_KM:
            ok = ok & (tl.load(km_ptr + b * smb + cols, mask=cv, other=0) != 0)[None, :]
        s = tl.where(ok, s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), _NEG_INF)
    tl.store(lse_ptr + bhq * P + rows, lse, mask=rv)


@triton.jit
def key_tile(k_ptr, skb, skh, skt, b, h, cols, cv, offs_d, F32_DOT: tl.constexpr):
    """The [BLOCK_T, D] keys `cols` of (batch b, KV head h); zeros past the end."""
    k = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skt + offs_d[None, :], mask=cv[:, None], other=0.0)
    if F32_DOT:
        k = k.to(tl.float32)
    return k


@triton.jit
def _probe_sum_kernel(q_ptr, sqb, sqh, sqp, k_ptr, skb, skh, skt, pos_ptr, km_ptr, smb, lse_ptr,
                      acc_ptr, cnt_ptr, P, T, HKV, R, qk_scale,
                      D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                      HAS_KM: tl.constexpr, F32_DOT: tl.constexpr):
    tb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    cols = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cv = cols < T
    offs_d = tl.arange(0, D)
    k = key_tile(k_ptr, skb, skh, skt, b, h, cols, cv, offs_d, F32_DOT)
    kvis = cv
    if HAS_KM:
        kvis = kvis & (tl.load(km_ptr + b * smb + cols, mask=cv, other=0) != 0)
    acc = tl.zeros([BLOCK_T], tl.float32)
    cnt = tl.zeros([BLOCK_T], tl.float32)
    t_first = tb * BLOCK_T
    offs_p = tl.arange(0, BLOCK_P)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + offs_p
        rv = rows < P
        pos = tl.load(pos_ptr + rows, mask=rv, other=-1)
        if tl.max(pos, 0) >= t_first:  # probes before this key block see none of it
            ok = (cols[None, :] <= pos[:, None]) & kvis[None, :]
            cnt += tl.sum(ok.to(tl.float32), 0)
            for r in range(0, R):
                hq = h * R + r
                q = tl.load(q_ptr + b * sqb + hq * sqh + rows[:, None] * sqp + offs_d[None, :], mask=rv[:, None], other=0.0)
                if F32_DOT:
                    q = q.to(tl.float32)
                lse = tl.load(lse_ptr + (b * HKV * R + hq) * P + rows, mask=rv, other=0.0)
                s = tl.dot(q, tl.trans(k)) * qk_scale
                a = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
                acc += tl.sum(a, 0)
    tl.store(acc_ptr + bh * T + cols, acc / R, mask=cv)
    if h == 0:
        tl.store(cnt_ptr + b * T + cols, cnt, mask=cv)


def probe_scores_triton(query, keys, probe_pos, key_mask, scaling, block_p=64, block_t=128, num_warps=4):
    b, hq, p, d = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    r = hq // hkv
    dev = query.device
    pos = probe_pos.to(device=dev, dtype=torch.int32).contiguous()
    km = key_mask.to(torch.uint8) if key_mask is not None else pos
    smb = km.stride(0) if key_mask is not None else 0
    lse = torch.empty((b, hq, p), device=dev, dtype=torch.float32)
    acc = torch.empty((b, hkv, t), device=dev, dtype=torch.float32)
    cnt = torch.empty((b, 1, t), device=dev, dtype=torch.float32)
    f32 = dev.type != "cuda"  # the CPU interpreter gets 16-bit dots wrong for bf16
    qk = scaling * 1.4426950408889634
    common = dict(D=d, BLOCK_P=block_p, BLOCK_T=block_t, HAS_KM=key_mask is not None, F32_DOT=f32, num_warps=num_warps)
    _probe_lse_kernel[(triton.cdiv(p, block_p), b * hq)](
        query, query.stride(0), query.stride(1), query.stride(2), keys, keys.stride(0), keys.stride(1), keys.stride(2),
        pos, km, smb, lse, p, t, hq, r, qk, **common)
    _probe_sum_kernel[(triton.cdiv(t, block_t), b * hkv)](
        query, query.stride(0), query.stride(1), query.stride(2), keys, keys.stride(0), keys.stride(1), keys.stride(2),
        pos, km, smb, lse, acc, cnt, p, t, hkv, r, qk, **common)
    return acc / cnt.clamp_min(1.0), acc, cnt
