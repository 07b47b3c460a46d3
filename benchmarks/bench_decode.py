"""Kernel-level decode benchmark: packed decode attention vs fp16 SDPA (enable_gqa).

Caches are synthesized at real shapes (random codes and parameters: byte traffic does not
depend on the values). Correctness is checked separately on quantized random data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zipkv.kernels.decode_attention import decode_attention, decode_attention_reference
from zipkv.kernels.packed import PackedSegment
from benchmarks.timing import copies_needed, time_calls

# Cache recipes: (bits, share of the quantized tokens, key_group, value_group, cs_chunk)
RECIPES = {
    # ZipCache 4/2: 60% salient 4-bit, 40% 2-bit, keys channelwise per appended block of 128
    # tokens, values channel-separable tokenwise (one factor row per block).
    "zipcache42": [(2, 0.4, 128, None, 128), (4, 0.6, 128, None, 128)],
    # Same, with 100-token blocks (the paper's streaming interval): groups straddle tiles.
    "zipcache42_b100": [(2, 0.4, 100, None, 100), (4, 0.6, 100, None, 100)],
    "kivi2": [(2, 1.0, 32, 32, None)],
    "kivi4": [(4, 1.0, 32, 32, None)],
}


def random_segment(b, h, n, d, bits, key_group, value_group, cs_chunk, dtype=torch.float16, device="cuda"):
    kw = dict(device=device)
    g = -(-n // key_group)
    vg = value_group or d
    seg = PackedSegment(
        bits=bits,
        k_codes=torch.randint(0, 256, (b, h, n, d * bits // 8), dtype=torch.uint8, **kw),
        k_scale=(torch.rand(b, h, g, d, **kw) * 0.1 + 0.01).to(dtype),
        k_min=(torch.randn(b, h, g, d, **kw) * 0.5).to(dtype),
        token_group=(torch.arange(n, **kw) // key_group).int(),
        v_codes=torch.randint(0, 256, (b, h, n, d * bits // 8), dtype=torch.uint8, **kw),
        v_scale=(torch.rand(b, h, n, d // vg, **kw) * 0.1 + 0.01).to(dtype),
        v_min=(torch.randn(b, h, n, d // vg, **kw) * 0.5).to(dtype),
    )
    if cs_chunk:
        c = -(-n // cs_chunk)
        seg.v_channel = (torch.rand(b, h, c, d, **kw) + 0.5).to(dtype)
        seg.token_chunk = (torch.arange(n, **kw) // cs_chunk).int()
    return seg


def make_cache(recipe, b, h, n, d, window=128, dtype=torch.float16, device="cuda"):
    """(segments in key order, k_fp, v_fp) with n tokens in all, `window` of them fp16."""
    nq = n - window
    segs = []
    left = nq
    for i, (bits, share, kg, vg, cs) in enumerate(RECIPES[recipe]):
        cnt = left if i == len(RECIPES[recipe]) - 1 else int(round(nq * share))
        left -= cnt
        segs.append(random_segment(b, h, cnt, d, bits, kg, vg, cs, dtype, device))
    k_fp = torch.randn(b, h, window, d, device=device, dtype=dtype)
    v_fp = torch.randn(b, h, window, d, device=device, dtype=dtype)
    return segs, k_fp, v_fp


def cache_bytes(segs, k_fp, v_fp) -> int:
    return sum(s.nbytes() for s in segs) + k_fp.numel() * k_fp.element_size() * 2


def bench_sdpa(b, hq, hkv, n, d, dtype=torch.float16, reps=20):
    kv_bytes = 2 * b * hkv * n * d * 2
    copies = copies_needed(kv_bytes)
    sets = []
    for _ in range(copies):
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype)
        sets.append((q, k, v))
    calls = [lambda s=s: F.scaled_dot_product_attention(*s, enable_gqa=True) for s in sets]
    t = time_calls(calls, reps=reps)
    t["bytes"] = kv_bytes
    t["gbps"] = kv_bytes / (t["ms"] * 1e-3) / 1e9
    t["copies"] = copies
    del sets, calls
    torch.cuda.empty_cache()
    return t


def bench_packed(recipe, b, hq, hkv, n, d, reps=20, window=128, graph=True, **tuning):
    segs, kf, vf = make_cache(recipe, b, hkv, n, d, window)
    nbytes = cache_bytes(segs, kf, vf)
    copies = copies_needed(nbytes)
    sets = [(segs, kf, vf)] + [make_cache(recipe, b, hkv, n, d, window) for _ in range(copies - 1)]
    qs = [torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16) for _ in sets]
    calls = [lambda s=s, q=q: decode_attention(q, s[0], s[1], s[2], impl="triton", **tuning) for s, q in zip(sets, qs)]
    t = time_calls(calls, reps=reps, graph=graph)
    launch = {}  # the kernels' registers and grids, from one more call asked to describe them
    decode_attention(qs[0], segs, kf, vf, impl="triton", record=launch, **tuning)
    t["launch"] = launch
    t["bytes"] = nbytes
    t["gbps"] = nbytes / (t["ms"] * 1e-3) / 1e9
    t["copies"] = copies
    t["fp16_equiv_bytes"] = 2 * b * hkv * n * d * 2
    del sets, calls, qs
    torch.cuda.empty_cache()
    return t


def check_decode(device="cuda", **tuning) -> list[dict]:
    """Kernel vs float32 reference on quantized random data, on the GPU, several layouts
    (`tuning` goes to decode_attention, e.g. dequant=True for v6)."""
    from zipkv.quant.schemes import quantize_keys_channelwise, quantize_values_tokenwise

    def seg_from(k, v, bits, kg, vg, cs):
        kc, ks, km, _ = quantize_keys_channelwise(k, bits, kg)
        vc, vs, vm, f = quantize_values_tokenwise(v, bits, vg, cs)
        n = k.shape[2]
        return PackedSegment(bits, kc, ks, km, (torch.arange(n, device=device) // (kg or n)).int(), vc, vs, vm,
                             f, torch.zeros(n, dtype=torch.int32, device=device) if cs else None)

    out = []
    cases = [
        dict(name="zipcache42 fp16 B2 N8K", b=2, hkv=8, r=4, n=(3200, 4800, 192), d=128, tq=1, dtype=torch.float16,
             cfg=[(2, None, None, True), (4, None, None, True)], mask=False),
        dict(name="kivi2 bf16 padded B3 N3K", b=3, hkv=2, r=4, n=(3000, 0, 100), d=128, tq=1, dtype=torch.bfloat16,
             cfg=[(2, 32, 32, False)], mask=True),
        dict(name="4/8-bit Tq=4 causal D64", b=2, hkv=3, r=3, n=(700, 500, 64), d=64, tq=4, dtype=torch.float16,
             cfg=[(4, 64, None, True), (8, None, 16, False)], mask=False),
    ]
    for c in cases:
        g = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))  # fresh data
        segs = []
        for (bits, kg, vg, cs), n in zip(c["cfg"], c["n"][:2]):
            k = torch.randn(c["b"], c["hkv"], n, c["d"], device=device, generator=g).to(c["dtype"]) * 2
            v = torch.randn(c["b"], c["hkv"], n, c["d"], device=device, generator=g).to(c["dtype"])
            segs.append(seg_from(k, v, bits, kg, vg, cs))
        nf = c["n"][2]
        kf = torch.randn(c["b"], c["hkv"], nf, c["d"], device=device, generator=g).to(c["dtype"])
        vf = torch.randn(c["b"], c["hkv"], nf, c["d"], device=device, generator=g).to(c["dtype"])
        q = torch.randn(c["b"], c["hkv"] * c["r"], c["tq"], c["d"], device=device, generator=g).to(c["dtype"])
        nt = sum(s.num_tokens for s in segs) + nf
        mask = None
        if c["mask"]:
            mask = torch.ones(c["b"], nt, dtype=torch.bool, device=device)
            mask[1, :1234] = False
        causal = c["tq"] > 1
        ref = decode_attention_reference(q, segs, kf, vf, mask=mask, causal=causal)
        res = decode_attention(q, segs, kf, vf, mask=mask, causal=causal, impl="triton", **tuning)
        err = ((res.float() - ref.float()).norm() / ref.float().norm()).item()
        out.append({"case": c["name"], "rel_err": err, "finite": bool(torch.isfinite(res).all()), "ok": err < 1e-2})
    return out


def sdpa_decode_flops(b, hq, n, d):
    return 4 * b * hq * n * d


def llama3_8b_heads():
    return dict(hq=32, hkv=8, d=128)


__all__ = ["RECIPES", "bench_packed", "bench_sdpa", "check_decode", "make_cache", "random_segment", "math"]
