"""Triton kernels of window_step.py: one launch each per layer and decoded token.

Both read the window's valid length from the device (lengths[-1]), so a CUDA graph replays
them unchanged. One program per (batch row, head): the window is at most a few hundred slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))
_INF = tl.constexpr(float("inf"))


@triton.jit
def _window_append_kernel(k_ptr, skb, skh, v_ptr, svb, svh, kw_ptr, swb, swh, swt, vw_ptr, svwb, svwh, svwt,
                          len_ptr, n_last, slot_ptr, ssb, ssh, bad_ptr, H, D: tl.constexpr, SLOTS: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    if SLOTS:  # write_slots: each (row, head) its own slot
        slot = tl.load(slot_ptr + b * ssb + h * ssh)
    else:  # window_append: every head at lengths[-1]
        slot = tl.load(len_ptr + n_last)
    offs = tl.arange(0, D)
    k = tl.load(k_ptr + b * skb + h * skh + offs)
    v = tl.load(v_ptr + b * svb + h * svh + offs)
    tl.store(kw_ptr + b * swb + h * swh + slot * swt + offs, k)
    tl.store(vw_ptr + b * svwb + h * svwh + slot * svwt + offs, v)
    kf, vf = k.to(tl.float32), v.to(tl.float32)
    bad = (kf != kf) | (tl.abs(kf) == _INF) | (vf != vf) | (tl.abs(vf) == _INF)
    n_bad = tl.sum(bad.to(tl.int32), 0)
    tl.store(bad_ptr, 1, mask=n_bad > 0)  # every writer writes 1: no race


@triton.jit
def _window_scores_kernel(q_ptr, sqb, sqh, k_ptr, skb, skh, skt, len_ptr, n_last, real_ptr, srb,
                          sum_ptr, cnt_ptr, HKV, W, R, qk_scale, D: tl.constexpr, BLOCK_W: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // HKV
    h = bh % HKV
    n = tl.load(len_ptr + n_last)
    cols = tl.arange(0, BLOCK_W)
    cv = cols < W
    real = tl.load(real_ptr + b * srb + cols, mask=cv, other=0) != 0
    vis = cv & (cols < n) & real
    offs_d = tl.arange(0, D)
    k = tl.load(k_ptr + b * skb + h * skh + cols[:, None] * skt + offs_d[None, :], mask=cv[:, None], other=0.0)
    k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_W], tl.float32)
    for r in range(0, R):
        q = tl.load(q_ptr + b * sqb + (h * R + r) * sqh + offs_d).to(tl.float32)
        s = tl.where(vis, tl.sum(k * q[None, :], 1) * qk_scale, _NEG_INF)
        m = tl.max(s, 0)
        m_safe = tl.where(m == _NEG_INF, 0.0, m)
        p = tl.where(vis, tl.exp2(s - m_safe), 0.0)
        total = tl.sum(p, 0)
        acc += p / tl.where(total > 0, total, 1.0)  # no visible slot: zeros, as the reference
    old = tl.load(sum_ptr + bh * W + cols, mask=cv, other=0.0)
    tl.store(sum_ptr + bh * W + cols, old + acc / R, mask=cv)
    if h == 0:
        old_c = tl.load(cnt_ptr + b * W + cols, mask=cv, other=0.0)
        tl.store(cnt_ptr + b * W + cols, old_c + vis.to(tl.float32), mask=cv)


def token_write_triton(keys, values, k_buf, v_buf, nonfinite, lengths=None, slot=None) -> None:
    """One launch of _window_append_kernel: the token at lengths[-1] (window_append) or at
    slot[b, h] (write_slots); the pointer of the other mode is never read (the given tensor
    stands in for it)."""
    b, h, _, d = k_buf.shape
    per_head = slot is not None
    len_ptr, n_last = (slot, 0) if per_head else (lengths, lengths.numel() - 1)
    slot_ptr, (ssb, ssh) = (slot, slot.stride()[:2]) if per_head else (lengths, (0, 0))
    _window_append_kernel[(b * h,)](
        keys, keys.stride(0), keys.stride(1), values, values.stride(0), values.stride(1),
        k_buf, k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), v_buf, v_buf.stride(0), v_buf.stride(1),
        v_buf.stride(2), len_ptr, n_last, slot_ptr, ssb, ssh, nonfinite.view(torch.uint8), h, D=d, SLOTS=per_head,
        num_warps=1)


def window_scores_triton(query, k_win, lengths, real_win, score_sum, score_count, scaling: float) -> None:
    b, hkv, w, d = k_win.shape
    r = query.shape[1] // hkv
    block_w = triton.next_power_of_2(w)
    real = real_win.view(torch.uint8)  # a reinterpretation: no copy, no launch
    _window_scores_kernel[(b * hkv,)](
        query, query.stride(0), query.stride(1), k_win, k_win.stride(0), k_win.stride(1), k_win.stride(2),
        lengths, lengths.numel() - 1, real, real.stride(0), score_sum, score_count, hkv, w, r,
        scaling * 1.4426950408889634, D=d, BLOCK_W=block_w, num_warps=8 if block_w * d > 8192 else 4)
