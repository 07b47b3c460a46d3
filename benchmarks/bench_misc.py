"""GPU checks and timings of the quantize+pack, probe-score and sparse-prefill kernels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.timing import time_calls


def check_quantize_pack() -> list[dict]:
    from zipkv.quant.schemes import quantize_keys_channelwise, quantize_values_tokenwise

    from zipkv.kernels.quantize_pack import quantize_pack_keys, quantize_pack_values

    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(2, 4, 1000, 128, device="cuda", generator=g) * 3).to(dtype)
        for bits in (2, 4, 8):
            for group in (None, 128):
                a, r = quantize_pack_keys(x, bits, group), quantize_keys_channelwise(x, bits, group)
                out.append({"case": f"K {dtype} {bits}b g{group}", "codes_mismatch": (a[0] != r[0]).float().mean().item(),
                            "params_equal": bool(torch.equal(a[1], r[1]) and torch.equal(a[2], r[2]))})
            for group, cs in ((None, True), (32, False)):
                a, r = quantize_pack_values(x, bits, group, cs), quantize_values_tokenwise(x, bits, group, cs)
                out.append({"case": f"V {dtype} {bits}b g{group} cs{cs}", "codes_mismatch": (a[0] != r[0]).float().mean().item(),
                            "params_equal": bool(torch.equal(a[1], r[1]) and torch.equal(a[2], r[2]))})
    return out


def check_probe() -> list[dict]:
    from zipkv.kernels.probe_scores import probe_scores, probe_scores_reference

    g = torch.Generator(device="cuda").manual_seed(1)
    t, p = 3000, 300
    q = torch.randn(2, 32, p, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(2, 8, t, 128, device="cuda", generator=g).bfloat16()
    pos = torch.cat([torch.randperm(t - 150, device="cuda", generator=g)[:150].sort().values, torch.arange(t - 150, t, device="cuda")])
    km = torch.ones(2, t, dtype=torch.bool, device="cuda")
    km[1, :500] = False
    out, ref = probe_scores(q, k, pos, km), probe_scores_reference(q, k, pos, km)
    return [{"case": name, "rel_err": ((o - e).norm() / e.norm()).item()} for name, o, e in zip(("normalized", "accumulated", "counts"), out, ref)]


def check_sparse() -> list[dict]:
    from zipkv.kernels.sparse_prefill import sparse_prefill_attention, sparse_prefill_reference

    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, 32, 2048, 128, device="cuda", generator=g).half()
    k = torch.randn(1, 8, 2048, 128, device="cuda", generator=g).half()
    v = torch.randn(1, 8, 2048, 128, device="cuda", generator=g).half()
    keep = torch.randperm(2048, device="cuda", generator=g)[:700].sort().values[None]
    ref = sparse_prefill_reference(q, k, v, keep).float()
    res = []
    for impl in ("gather", "triton"):
        o = sparse_prefill_attention(q, k, v, keep, impl=impl).float()
        res.append({"case": impl, "rel_err": ((o - ref).norm() / ref.norm()).item()})
    return res


def bench_quantize(b=8, h=8, n=32768, d=128, reps=10) -> list[dict]:
    from zipkv.kernels.quantize_pack import quantize_pack_keys, quantize_pack_values

    x = torch.randn(b, h, n, d, device="cuda", dtype=torch.float16)
    res = []
    for name, fn, bits in (
        ("keys 4b group=all", lambda: quantize_pack_keys(x, 4, None), 4),
        ("keys 2b group=128", lambda: quantize_pack_keys(x, 2, 128), 2),
        ("values 4b CS", lambda: quantize_pack_values(x, 4, None, True), 4),
        ("values 2b KIVI g32", lambda: quantize_pack_values(x, 2, 32, False), 2),
    ):
        for impl in ("triton", "reference"):
            call = fn if impl == "triton" else (lambda f=fn: None)
            if impl == "reference":
                from zipkv.quant.schemes import quantize_keys_channelwise, quantize_values_tokenwise

                call = {"keys 4b group=all": lambda: quantize_keys_channelwise(x, 4, None),
                        "keys 2b group=128": lambda: quantize_keys_channelwise(x, 2, 128),
                        "values 4b CS": lambda: quantize_values_tokenwise(x, 4, None, True),
                        "values 2b KIVI g32": lambda: quantize_values_tokenwise(x, 2, 32, False)}[name]
            t = time_calls([call], reps=reps, graph=False)
            moved = x.numel() * 2 + x.numel() * bits // 8
            res.append({"case": name, "impl": impl, "ms": t["ms"], "gbps_min_bytes": moved / (t["ms"] * 1e-3) / 1e9})
    return res


def llama_layer_prefill_ms(t: int, reps=5) -> dict:
    """One Llama-3-8B layer's prefill at t tokens (bf16): causal SDPA + its GEMMs."""
    x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
    w = {n: torch.randn(a, c, device="cuda", dtype=torch.bfloat16) * 0.01 for n, (a, c) in
         {"qkv": (4096, 6144), "o": (4096, 4096), "up": (4096, 28672), "down": (14336, 4096)}.items()}
    q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(t, 14336, device="cuda", dtype=torch.bfloat16)
    attn = time_calls([lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)], reps=reps, graph=False)
    gemm = time_calls([lambda: (x @ w["qkv"], x @ w["o"], x @ w["up"], h @ w["down"])], reps=reps, graph=False)
    return {"attention_ms": attn["ms"], "gemm_ms": gemm["ms"], "layer_ms": attn["ms"] + gemm["ms"]}


def bench_probe(contexts=(8192, 32768), reps=5, tilings=((64, 64), (128, 64), (64, 128))) -> list[dict]:
    """Probe saliency vs one layer's prefill, for ZipCache's default probes (5% recent + 5%
    random) and ZipVL's (64 recent + 64 random)."""
    from zipkv.kernels.probe_scores import probe_scores

    res = []
    for t in contexts:
        layer = llama_layer_prefill_ms(t)
        k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        for label, n in (("5%+5%", math.ceil(0.05 * t)), ("64+64", 64)):
            pos = torch.cat([torch.randperm(t - n, device="cuda")[:n].sort().values, torch.arange(t - n, t, device="cuda")])
            q = torch.randn(1, 32, pos.numel(), 128, device="cuda", dtype=torch.bfloat16)
            for bp, bt in tilings:
                tm = time_calls([lambda: probe_scores(q, k, pos, None, block_p=bp, block_t=bt)], reps=reps, graph=False)
                res.append({"context": t, "probe_set": label, "probes": pos.numel(), "block_p": bp, "block_t": bt,
                            "probe_ms": tm["ms"], **layer, "fraction_of_layer_prefill": tm["ms"] / layer["layer_ms"]})
    return res


def bench_sparse(t=32768, fractions=(0.1, 0.3, 0.5, 1.0), reps=5) -> list[dict]:
    from zipkv.kernels.sparse_prefill import sparse_prefill_attention

    q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
    dense = time_calls([lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)], reps=reps, graph=False)
    res = []
    for f in fractions:
        keep = torch.randperm(t, device="cuda")[: int(f * t)].sort().values[None]
        row = {"context": t, "kept_fraction": f, "dense_sdpa_ms": dense["ms"]}
        for impl in ("gather", "triton"):
            tm = time_calls([lambda: sparse_prefill_attention(q, k, v, keep, impl=impl)], reps=reps, graph=False)
            row[f"{impl}_ms"] = tm["ms"]
            row[f"{impl}_speedup_vs_dense"] = dense["ms"] / tm["ms"]
        res.append(row)
    return res
