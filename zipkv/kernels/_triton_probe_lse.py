"""One-pass Triton probe-score kernel, for probe rows whose log-sum-exp is already known.

The prompt's own causal attention (cuDNN / flash) computes every row's log-sum-exp, so pass 1
of _triton_probe.py is redundant there. One program per (batch, KV head, block of keys) keeps
its key block in shared memory and streams the probe rows of the R query heads of its GQA group,
adding exp(scale * q.k - lse) per key and counting the probe rows that see each key.

Causal visibility only (a probe row at key position p sees keys <= p; no key mask): probe
rows are sorted by position, so for each key block the rows split into three runs, counted
by the program itself (a few vector compares, no extra launches): rows before `lo` see none
of the block (not even visited), rows in [lo, hi) see part of it (masked), rows from `hi` on
see all of it (no mask, which keeps the hot loop to one dot, one FMA and one exp2 per
score). The loops carry no data-dependent branch, so Triton can software-pipeline their
loads. ACC2D keeps a [BLOCK_P, BLOCK_T] running sum and reduces over the rows once at the
end, instead of a cross-warp reduction every iteration.
"""

from __future__ import annotations

import triton
import triton.language as tl

import torch

from ._triton_probe import key_tile

_LOG2E = 1.4426950408889634


@triton.jit
def _exp2(x, EXP16: tl.constexpr):
    """2**x for x <= 0. EXP16 (an experiment, CUDA only): ex2.approx.f16x2 does two per
    special-function-unit op, twice fp32's rate, at fp16 precision (relative error ~1e-3,
    terms below 2**-24 lost); the exp is a bottleneck next to the dot at head dim 128."""
    if EXP16:
        h = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                      dtype=tl.float16, is_pure=True, pack=2)
        return h.to(tl.float32)
    else:
        return tl.exp2(x)


@triton.jit
def _row_block(q_ptr, sqp, lse_ptr, p0, lim, offs_p, offs_d, F32_DOT: tl.constexpr):
    """Probe rows p0 .. p0+BLOCK_P (those < lim): their query tile and log2-sum-exp (+inf
    for rows past lim, so they add exp2(-inf) = 0 without a select)."""
    idx = p0 + offs_p
    rv = idx < lim
    q = tl.load(q_ptr + idx[:, None] * sqp + offs_d[None, :], mask=rv[:, None], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    lse2 = tl.load(lse_ptr + idx, mask=rv, other=float("inf")) * 1.4426950408889634
    return idx, rv, q, lse2


@triton.jit
def _rows_seeing_block(pos_ptr, P, T, tb, BLOCK_T: tl.constexpr):
    """(lo, hi): probe rows with position < the block's first / last key (positions ascend):
    rows before lo see none of key block tb, rows in [lo, hi) part of it, the rest all of it."""
    t_first = tb * BLOCK_T
    t_last = tl.minimum(t_first + BLOCK_T, T) - 1
    lo = 0
    hi = 0
    for c0 in range(0, P, 1024):
        offs_c = c0 + tl.arange(0, 1024)
        pc = tl.load(pos_ptr + offs_c, mask=offs_c < P, other=T)
        lo += tl.sum((pc < t_first).to(tl.int32), 0)
        hi += tl.sum((pc < t_last).to(tl.int32), 0)
    return lo, hi


@triton.jit
def _block_counts(pos_ptr, cols, lo, hi, P, offs_p, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """Probe rows that see each key of the block: counts depend on positions only, and rows
    from hi on see every key."""
    cnt = tl.zeros([BLOCK_T], tl.float32) + (P - hi).to(tl.float32)
    for p0 in range(lo, hi, BLOCK_P):
        pos = tl.load(pos_ptr + p0 + offs_p, mask=p0 + offs_p < hi, other=-1)
        cnt += tl.sum((cols[None, :] <= pos[:, None]).to(tl.float32), 0)
    return cnt


@triton.jit
def _probe_lse_onepass_kernel(q_ptr, sqb, sqh, sqp, k_ptr, skb, skh, skt, pos_ptr, lse_ptr, slb, slh,
                              acc_ptr, cnt_ptr, P, T, HKV, R, qk_scale,
                              D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr,
                              F32_DOT: tl.constexpr, ACC2D: tl.constexpr, EXP16: tl.constexpr):
    tb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    cols = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cv = cols < T
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, BLOCK_P)
    kt = tl.trans(key_tile(k_ptr, skb, skh, skt, b, h, cols, cv, offs_d, F32_DOT))
    lo, hi = _rows_seeing_block(pos_ptr, P, T, tb, BLOCK_T)
    cnt = _block_counts(pos_ptr, cols, lo, hi, P, offs_p, BLOCK_P, BLOCK_T)
    acc = tl.zeros([BLOCK_T], tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_T], tl.float32)
    for r in range(0, R):
        hq = h * R + r
        qh = q_ptr + b * sqb + hq * sqh
        lh = lse_ptr + b * slb + hq * slh
        # rows that see part of the block: causal mask per score
        for p0 in range(lo, hi, BLOCK_P):
            idx, rv, q, lse2 = _row_block(qh, sqp, lh, p0, hi, offs_p, offs_d, F32_DOT)
            pos = tl.load(pos_ptr + idx, mask=rv, other=-1)
            ok = cols[None, :] <= pos[:, None]
            s = tl.dot(q, kt) * qk_scale - lse2[:, None]
            if ACC2D:
                acc2 += tl.where(ok, _exp2(s, EXP16), 0.0)
            else:
                acc += tl.sum(tl.where(ok, _exp2(s, EXP16), 0.0), 0)
        # rows that see the whole block
        for p0 in range(hi, P, BLOCK_P):
            _, _, q, lse2 = _row_block(qh, sqp, lh, p0, P, offs_p, offs_d, F32_DOT)
            s = tl.dot(q, kt) * qk_scale - lse2[:, None]
            if ACC2D:
                acc2 += _exp2(s, EXP16)
            else:
                acc += tl.sum(_exp2(s, EXP16), 0)
    if ACC2D:
        acc = tl.sum(acc2, 0)
    tl.store(acc_ptr + bh * T + cols, acc / R, mask=cv)
    if h == 0:
        tl.store(cnt_ptr + b * T + cols, cnt, mask=cv)


@triton.jit
def _probe_rows(q_head, sqp, lse_head, rows_ptr, idx, rv, offs_d, INDEXED: tl.constexpr, F32_DOT: tl.constexpr):
    """Query tile and log2-sum-exp of probe rows idx (valid: rv) of one head; INDEXED: the
    rows are picked through rows_ptr (no gather copy before the kernel)."""
    if INDEXED:
        row = tl.load(rows_ptr + idx, mask=rv, other=0)
    else:
        row = idx
    q = tl.load(q_head + row[:, None] * sqp + offs_d[None, :], mask=rv[:, None], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    lse2 = tl.load(lse_head + row, mask=rv, other=float("inf")) * 1.4426950408889634
    return q, lse2


@triton.jit
def _probe_lse_v2_kernel(q_ptr, sqb, sqh, sqp, k_ptr, skb, skh, skt, pos_ptr, lse_ptr, slb, slh, rows_ptr,
                         norm_ptr, acc_ptr, cnt_ptr, P, T, HKV, R, qk_scale,
                         D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
                         INDEXED: tl.constexpr, F32_DOT: tl.constexpr):
    """v2 of the one-pass kernel (same sums as v1):
    - grid (B * HKV, key blocks, SPLITS): the hardware starts blockIdx.x fastest, so every
      head's key block 0 (the one that the most probe rows see) starts first;
    - the R query heads' row blocks are one flattened loop (j -> head j // nb, block j % nb)
      for the partly seen rows and one for the fully seen rows: 2 pipelined loops per program
      instead of 2 * R, so the pipeline fills and drains twice instead of 2R times (at 8K a
      program runs 7-13 row blocks per head);
    - SPLITS > 1: program s of a key block takes flattened blocks s, s + SPLITS, ... and adds
      its sum into acc with atomics (acc zeroed by the caller, which then normalizes);
      SPLITS == 1 writes normalized = acc / max(cnt, 1) itself (no separate launches);
    - INDEXED: probe rows picked through rows_ptr in the kernel (no gather copy before it)."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // HKV
    h = bh % HKV
    cols = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    cv = cols < T
    offs_d = tl.arange(0, D)
    offs_p = tl.arange(0, BLOCK_P)
    kt = tl.trans(key_tile(k_ptr, skb, skh, skt, b, h, cols, cv, offs_d, F32_DOT))
    lo, hi = _rows_seeing_block(pos_ptr, P, T, tb, BLOCK_T)
    q0 = q_ptr + b * sqb + h * R * sqh
    l0 = lse_ptr + b * slb + h * R * slh
    acc2 = tl.zeros([BLOCK_P, BLOCK_T], tl.float32)
    # rows [lo, hi) see part of the block: causal mask per score
    nb_m = tl.cdiv(hi - lo, BLOCK_P)
    for j in range(split, R * nb_m, SPLITS):
        r = j // nb_m
        idx = lo + (j - r * nb_m) * BLOCK_P + offs_p
        rv = idx < hi
        q, lse2 = _probe_rows(q0 + r * sqh, sqp, l0 + r * slh, rows_ptr, idx, rv, offs_d, INDEXED, F32_DOT)
        pos = tl.load(pos_ptr + idx, mask=rv, other=-1)
        s = tl.dot(q, kt) * qk_scale - lse2[:, None]
        acc2 += tl.where(cols[None, :] <= pos[:, None], tl.exp2(s), 0.0)
    # rows [hi, P) see all of it: no mask
    nb_f = tl.cdiv(P - hi, BLOCK_P)
    for j in range(split, R * nb_f, SPLITS):
        r = j // nb_f
        idx = hi + (j - r * nb_f) * BLOCK_P + offs_p
        rv = idx < P
        q, lse2 = _probe_rows(q0 + r * sqh, sqp, l0 + r * slh, rows_ptr, idx, rv, offs_d, INDEXED, F32_DOT)
        s = tl.dot(q, kt) * qk_scale - lse2[:, None]
        acc2 += tl.exp2(s)
    acc = tl.sum(acc2, 0) / R
    if SPLITS == 1:
        cnt = _block_counts(pos_ptr, cols, lo, hi, P, offs_p, BLOCK_P, BLOCK_T)
        tl.store(acc_ptr + bh * T + cols, acc, mask=cv)
        tl.store(norm_ptr + bh * T + cols, acc / tl.maximum(cnt, 1.0), mask=cv)
        if h == 0:
            tl.store(cnt_ptr + b * T + cols, cnt, mask=cv)
    else:
        tl.atomic_add(acc_ptr + bh * T + cols, acc, mask=cv)
        if (h == 0) & (split == 0):
            cnt = _block_counts(pos_ptr, cols, lo, hi, P, offs_p, BLOCK_P, BLOCK_T)
            tl.store(cnt_ptr + b * T + cols, cnt, mask=cv)


# measured at 8K (v2 better) and 32K (v1 better) only; in between is unmeasured: v1, main's kernel
AUTO_V2_MAX_KEYS = 8192


# v1 default tiles: within noise of the best of 12 tilings at 8K and 32K on the H100 (probe_lse.json;
# 64x128 with 8 warps was best at 8K but 1.3x slower at 32K). exp16 measured no faster: off.
def probe_scores_lse_triton(query, keys, probe_pos, lse, scaling, rows=None, positions_sorted=False,
                            block_p=64, block_t=128, num_warps=4, num_stages=3, acc2d=True, exp16=False,
                            kernel="auto", splits=1, indexed=None):
    """query [B, Hq, Tq, D] and lse [B, Hq, Tq] (natural log of sum exp(scaling * q.k) over
    the keys each row saw); rows [P] picks the probe rows of both (None: all Tq rows are
    probes); probe_pos [P] their key positions (positions_sorted: the caller guarantees they
    ascend, which saves a sort). Returns (normalized [B, Hkv, T], acc [B, Hkv, T], cnt [B, 1, T]).

    kernel "v1": the first one-pass kernel (acc2d / exp16 are its experiments); "v2": heavy
    key blocks first, the R heads' row blocks in one flattened loop, normalization in the
    kernel, optional row splits (splits > 1: atomics into a zeroed acc) and in-kernel row
    indexing (indexed: no gather copy; rows through an index, which stalled v1's pipeline).
    "auto" (default): v2 with indexed rows up to AUTO_V2_MAX_KEYS keys, v1 above
    (probe_lse_v2.json: at 8K v2-indexed is 0.24-0.26 ms eager vs v1's 0.29-0.31, at 32K v2
    is 1.6-1.9 ms vs v1's 1.43-1.53). indexed=None: on for v2, off for v1."""
    b, hq, _, d = query.shape
    hkv, t = keys.shape[1], keys.shape[2]
    if kernel == "auto":
        kernel = "v2" if t <= AUTO_V2_MAX_KEYS else "v1"
    if indexed is None:
        indexed = kernel == "v2"
    dev = query.device
    pos = probe_pos.to(device=dev)
    pick = rows.to(device=dev) if rows is not None else None
    if not positions_sorted:  # the kernel walks the rows in position order
        pos, order = pos.sort()
        pick = order if pick is None else pick[order]
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    f32_dot = dev.type != "cuda"  # the CPU interpreter gets 16-bit dots wrong for bf16
    if kernel == "v2" and indexed and pick is not None:
        rows_arg = pick
    else:
        rows_arg = pos  # unused by the kernel unless INDEXED
        indexed = False
        # The probe rows are copied out (about 27 MB at 32K): loading them through an index in
        # v1 measured 0.5 ms slower at 32K on the H100 (the index load stalls the pipeline).
        # index_select: one kernel each, with less host work than advanced indexing.
        if pick is not None:
            query, lse = query.index_select(2, pick), lse.index_select(2, pick)
    if lse.stride(-1) != 1:
        lse = lse.contiguous()
    if query.stride(-1) != 1:
        query = query.contiguous()
    p = pos.numel()
    if kernel == "v1":
        acc = torch.empty((b, hkv, t), device=dev, dtype=torch.float32)
        cnt = torch.empty((b, 1, t), device=dev, dtype=torch.float32)
        _probe_lse_onepass_kernel[(triton.cdiv(t, block_t), b * hkv)](
            query, query.stride(0), query.stride(1), query.stride(2), keys, keys.stride(0), keys.stride(1), keys.stride(2),
            pos, lse, lse.stride(0), lse.stride(1), acc, cnt, p, t, hkv, hq // hkv,
            scaling * _LOG2E, D=d, BLOCK_P=block_p, BLOCK_T=block_t, F32_DOT=f32_dot,
            ACC2D=acc2d, EXP16=exp16, num_warps=num_warps, num_stages=num_stages)
        return acc / cnt.clamp_min(1.0), acc, cnt
    if kernel != "v2":
        raise ValueError(f"kernel must be 'v1' or 'v2' (got {kernel!r})")
    splits = max(1, int(splits))
    acc = (torch.zeros if splits > 1 else torch.empty)((b, hkv, t), device=dev, dtype=torch.float32)
    norm = torch.empty((b, hkv, t), device=dev, dtype=torch.float32) if splits == 1 else acc
    cnt = torch.empty((b, 1, t), device=dev, dtype=torch.float32)
    _probe_lse_v2_kernel[(b * hkv, triton.cdiv(t, block_t), splits)](
        query, query.stride(0), query.stride(1), query.stride(2), keys, keys.stride(0), keys.stride(1), keys.stride(2),
        pos, lse, lse.stride(0), lse.stride(1), rows_arg, norm, acc, cnt, p, t, hkv, hq // hkv,
        scaling * _LOG2E, D=d, BLOCK_P=block_p, BLOCK_T=block_t, SPLITS=splits, INDEXED=indexed,
        F32_DOT=f32_dot, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        norm = acc / cnt.clamp_min(1.0)
    return norm, acc, cnt
