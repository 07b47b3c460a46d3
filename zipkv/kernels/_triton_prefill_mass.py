"""Triton kernels of prefill_mass.py: H2O's accumulated attention of a causal prompt, with no
T x T matrix in memory.

`_lse_kernel`, program (block of BM queries, b * Hq + hq): the log-sum-exp (base 2) of each
query's scaled scores over the keys it sees (key <= query, both real), online over blocks of BN
keys up to the block's last query: one flash-attention forward without the values.
`_mass_kernel`, program (block of BN keys, b * Hkv + h): for each of the G query heads of KV
head h and each block of BM queries from the key block on, p = exp2(s - lse2) over the visible
(query, key) pairs, summed over the queries; the key block's totals are the mean over the G
heads. Both read only q, k and the lse: the work is two QK^T products over the causal half,
the memory the inputs and [B, Hq, T] + [B, Hkv, T] floats. Without padding, only the query
blocks on the diagonal are masked. Given the prompt attention's own
lse (the flash / cuDNN forward returns it), only `_mass_kernel` runs: one QK^T product.

Row and head offsets are 64-bit (B * H * T * D passes 2**31 at 32K x 8 x 32 heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))
_LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, qk_scale, IEEE: tl.constexpr):
    """q [BM, D] . k [BN, D]^T * qk_scale in float32 (float32 states: full-precision products,
    where the default would be TF32)."""
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    return tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale


@triton.jit
def _token_block(ptr, stride_t, real_ptr, start, T, BLOCK: tl.constexpr, D: tl.constexpr):
    """Tokens start .. start + BLOCK of one (row, head): their positions, whether they exist,
    their [BLOCK, D] states (zeros past T) and whether they are real (the row's padding mask;
    False past T)."""
    offs = start + tl.arange(0, BLOCK)
    inside = offs < T
    tile = tl.load(ptr + offs[:, None] * stride_t + tl.arange(0, D)[None, :], mask=inside[:, None], other=0.0)
    real = tl.load(real_ptr + offs, mask=inside, other=0) != 0
    return offs, inside, tile, real


@triton.jit
def _visible(offs_m, offs_n, m_ok, n_ok):
    """[BM, BN]: query m sees key n (causal; m_ok / n_ok: which queries / keys may take part)."""
    return (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :] & m_ok[:, None]


@triton.jit
def _lse_kernel(q_ptr, sqb, sqh, sqt, k_ptr, skb, skh, skt, real_ptr, srb, lse_ptr, slb, slh,
                HQ, T, qk_scale, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                IEEE: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    hq = (bh % HQ).to(tl.int64)
    h = hq // G
    offs_m, in_m, q, q_real = _token_block(q_ptr + b * sqb + hq * sqh, sqt, real_ptr + b * srb, blk * BM, T, BM, D)
    m_i = tl.full([BM], _NEG_INF, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    end = tl.minimum((blk + 1) * BM, T)
    for start in range(0, end, BN):
        offs_n, _, k, k_real = _token_block(k_ptr + b * skb + h * skh, skt, real_ptr + b * srb, start, T, BN, D)
        s = _scores(q, k, qk_scale, IEEE)
        s = tl.where(_visible(offs_m, offs_n, q_real, k_real), s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        safe = tl.where(m_new > _NEG_INF, m_new, 0.0)
        l_i = l_i * tl.exp2(tl.where(m_i > _NEG_INF, m_i - safe, _NEG_INF)) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m_i = m_new
    lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), _NEG_INF)
    tl.store(lse_ptr + b * slb + hq * slh + offs_m, lse2, mask=in_m)


@triton.jit
def _mass_kernel(q_ptr, sqb, sqh, sqt, k_ptr, skb, skh, skt, real_ptr, srb, lse_ptr, slb, slh, tot_ptr, stb, sth,
                 HKV, T, qk_scale, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 IEEE: tl.constexpr, ALL_REAL: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = (bh % HKV).to(tl.int64)
    offs_n, in_n, k, k_real = _token_block(k_ptr + b * skb + h * skh, skt, real_ptr + b * srb, blk * BN, T, BN, D)
    # the probabilities summed element-wise over the query blocks and reduced over the BM rows
    # once at the end: a reduction across the rows of an MMA tile per block costs shuffles and
    # a shared-memory round trip, the element-wise add nothing
    acc = tl.zeros([BM, BN], tl.float32)
    first = (blk * BN) // BM * BM  # queries before the key block see none of it
    # query blocks from `clear` on lie wholly below the diagonal: without padding they need no
    # mask (queries past T load lse = +inf, so their p is 0)
    clear = tl.cdiv((blk + 1) * BN, BM) * BM if ALL_REAL else T
    for g in range(G):
        hq = h * G + g
        q_base = q_ptr + b * sqb + hq * sqh
        lse_base = lse_ptr + b * slb + hq * slh
        for start in range(first, tl.minimum(clear, T), BM):
            offs_m, in_m, q, q_real = _token_block(q_base, sqt, real_ptr + b * srb, start, T, BM, D)
            lse2 = tl.load(lse_base + offs_m, mask=in_m, other=0.0)
            s = _scores(q, k, qk_scale, IEEE)
            visible = _visible(offs_m, offs_n, q_real & (lse2 > _NEG_INF), k_real)
            acc += tl.where(visible, tl.exp2(tl.where(visible, s - lse2[:, None], 0.0)), 0.0)
        if ALL_REAL:
            for start in range(clear, T, BM):
                offs_m = start + tl.arange(0, BM)
                in_m = offs_m < T
                q = tl.load(q_base + offs_m[:, None] * sqt + tl.arange(0, D)[None, :], mask=in_m[:, None], other=0.0)
                lse2 = tl.load(lse_base + offs_m, mask=in_m, other=float("inf"))
                acc += tl.exp2(_scores(q, k, qk_scale, IEEE) - lse2[:, None])
    tl.store(tot_ptr + b * stb + h * sth + offs_n, tl.sum(acc, 0) / G, mask=in_n)


def prefill_mass_triton(query, keys, real, scaling: float, lse=None, block_m: int = 64, block_n: int = 64,
                        num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """totals float32 [B, Hkv, T] (prefill_mass.prefill_attention_mass without the padding's
    -inf, which the wrapper marks). lse: the prompt attention's own log-sum-exp (natural log,
    float32 [B, Hq, T]) when the caller has it, which saves the first kernel. The tiles: the
    fastest of experiments/prefill_mass_sweep.py on the H200 at 8K and 32K (64 x 64, 4 warps,
    3 stages: 1.40 / 17.0 ms for the mass pass at 32 / 8 heads, d 128, vs 1.80 / 20.0 at 2
    stages; NOTES, GPU session 2026-12-02 fourth)."""
    b, hq, t, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    real = real.to(torch.int8).contiguous()
    totals = torch.empty(b, hkv, t, dtype=torch.float32, device=query.device)
    qk_scale = float(scaling) * _LOG2E
    ieee = query.dtype == torch.float32
    if lse is None:
        lse = torch.empty(b, hq, t, dtype=torch.float32, device=query.device)
        _lse_kernel[(triton.cdiv(t, block_m), b * hq)](
            query, query.stride(0), query.stride(1), query.stride(2), keys, keys.stride(0), keys.stride(1),
            keys.stride(2), real, real.stride(0), lse, lse.stride(0), lse.stride(1), hq, t, qk_scale, G=g, D=d,
            BM=block_m, BN=block_n, IEEE=ieee, num_warps=num_warps, num_stages=num_stages)
    else:
        lse = (lse.float() * _LOG2E).contiguous()  # the kernels work in base 2
    _mass_kernel[(triton.cdiv(t, block_n), b * hkv)](
        query, query.stride(0), query.stride(1), query.stride(2), keys, keys.stride(0), keys.stride(1), keys.stride(2),
        real, real.stride(0), lse, lse.stride(0), lse.stride(1), totals, totals.stride(0), totals.stride(1),
        hkv, t, qk_scale, G=g, D=d, BM=block_m, BN=block_n, IEEE=ieee, ALL_REAL=bool(real.all()),
        num_warps=num_warps, num_stages=num_stages)
    return totals
