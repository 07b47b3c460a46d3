"""Triton kernel of paged_decode.py: decode attention read through a block table.

One program per (sequence, query head). It walks the sequence's pages in logical order
(`block_table[b, j]` names the pool page of its j-th page), unpacks each page's key codes
(plane layout: channel c in byte c % W at shift (c // W) * bits), dequantizes with the
page's channelwise key scales and each token's value scales, and keeps an online softmax
in float32. Pages past the sequence's length are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _paged_decode_kernel(q_ptr, sqb, sqh, out_ptr, sob, soh,
                         kc_ptr, skp, skh, skt, ks_ptr, km_ptr, sksp, sksh,
                         vc_ptr, svp, svh, svt, vs_ptr, vm_ptr, svsp, svsh, svst,
                         table_ptr, stb, len_ptr, GROUPS, qk_scale,
                         D: tl.constexpr, S: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
                         VGROUP: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // GROUPS  # the KV head of this query head (GQA)
    length = tl.load(len_ptr + b)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, S)
    kw: tl.constexpr = D * KBITS // 8
    vw: tl.constexpr = D * VBITS // 8
    k_byte = offs_d % kw
    k_shift = (offs_d // kw) * KBITS
    v_byte = offs_d % vw
    v_shift = (offs_d // vw) * VBITS
    q = tl.load(q_ptr + b * sqb + hq * sqh + offs_d).to(tl.float32)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    n_pages = tl.cdiv(length, S)
    for j in range(0, n_pages):
        page = tl.load(table_ptr + b * stb + j).to(tl.int64)
        valid = (j * S + offs_t) < length
        kbytes = tl.load(kc_ptr + page * skp + h * skh + offs_t[:, None] * skt + k_byte[None, :],
                         mask=valid[:, None], other=0).to(tl.int32)
        kcode = ((kbytes >> k_shift[None, :]) & ((1 << KBITS) - 1)).to(tl.float32)
        kscale = tl.load(ks_ptr + page * sksp + h * sksh + offs_d).to(tl.float32)
        kmin = tl.load(km_ptr + page * sksp + h * sksh + offs_d).to(tl.float32)
        keys = kcode * kscale[None, :] + kmin[None, :]
        s = tl.sum(keys * q[None, :], 1) * qk_scale
        s = tl.where(valid, s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        p = tl.where(valid, p, 0.0)
        alpha = tl.exp2(m_i - m_new)
        vbytes = tl.load(vc_ptr + page * svp + h * svh + offs_t[:, None] * svt + v_byte[None, :],
                         mask=valid[:, None], other=0).to(tl.int32)
        vcode = ((vbytes >> v_shift[None, :]) & ((1 << VBITS) - 1)).to(tl.float32)
        vg = offs_d // VGROUP
        vscale = tl.load(vs_ptr + page * svsp + h * svsh + offs_t[:, None] * svst + vg[None, :],
                         mask=valid[:, None], other=0.0).to(tl.float32)
        vmin = tl.load(vm_ptr + page * svsp + h * svsh + offs_t[:, None] * svst + vg[None, :],
                       mask=valid[:, None], other=0.0).to(tl.float32)
        vals = vcode * vscale + vmin
        acc = acc * alpha + tl.sum(p[:, None] * vals, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)  # an empty sequence attends to nothing: zeros
    tl.store(out_ptr + b * sob + hq * soh + offs_d, out.to(out_ptr.dtype.element_ty))


def paged_decode_triton(query: torch.Tensor, store, scaling: float) -> torch.Tensor:
    """query [B, Hq, D] (B <= store.max_seqs: sequences 0..B-1) -> [B, Hq, D] in query's dtype."""
    b, hq, d = query.shape
    out = torch.empty_like(query)
    q = query.contiguous()
    kc, ks, km, vc, vs, vm = store.k_codes, store.k_scale, store.k_min, store.v_codes, store.v_scale, store.v_min
    table = store.block_table
    _paged_decode_kernel[(b, hq)](
        q, q.stride(0), q.stride(1), out, out.stride(0), out.stride(1),
        kc, kc.stride(0), kc.stride(1), kc.stride(2), ks, km, ks.stride(0), ks.stride(1),
        vc, vc.stride(0), vc.stride(1), vc.stride(2), vs, vm, vs.stride(0), vs.stride(1), vs.stride(2),
        table, table.stride(0), store.lengths, hq // store.num_heads, scaling * 1.4426950408889634,
        D=d, S=store.page_size, KBITS=store.key_bits, VBITS=store.value_bits, VGROUP=store.value_group)
    return out
