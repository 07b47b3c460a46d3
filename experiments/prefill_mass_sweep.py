"""The H2O prefill mass kernel's tile configurations at Llama-3-8B head shapes (32 query / 8 KV
heads, D 128, bf16, batch 1), beside the prompt attention itself (SDPA causal, and the
lse-returning op the h2o layer calls), CUDA events, median of reps:

    python3 -m experiments.prefill_mass_sweep --out OUT.json [--lengths 8192 32768]

Each config: the one-pass path (lse given, `_mass_kernel` only) and, for the default config,
the two-pass path; every config's totals checked against the default's (max abs diff).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from zipkv.kernels._triton_prefill_mass import prefill_mass_triton
from zipkv.kernels.attention_lse import causal_attention_lse

CONFIGS = [  # block_m, block_n, num_warps, num_stages
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3),
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3),
]


def timed(fn, reps):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for t in args.lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        real = torch.ones(1, t, dtype=torch.bool, device="cuda")
        scale = 128 ** -0.5
        sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
                        args.reps)
        lse_ms = timed(lambda: causal_attention_lse(q, k, v, scale), args.reps)
        fused = causal_attention_lse(q, k, v, scale)
        lse = fused[1] if fused is not None else None
        base = prefill_mass_triton(q, k, real, scale)
        two_pass_ms = timed(lambda: prefill_mass_triton(q, k, real, scale), args.reps)
        row = {"length": t, "sdpa_causal_ms": sdpa_ms, "attention_with_lse_ms": lse_ms,
               "lse_available": lse is not None, "two_pass_default_ms": two_pass_ms, "configs": []}
        for bm, bn, warps, stages in CONFIGS:
            kw = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                got = prefill_mass_triton(q, k, real, scale, lse=lse, **kw)
                ms = timed(lambda: prefill_mass_triton(q, k, real, scale, lse=lse, **kw), args.reps)
                row["configs"].append({**kw, "one_pass_ms": ms, "max_abs_diff": float((got - base).abs().max())})
            except Exception as error:  # a config that does not fit (shared memory, registers)
                row["configs"].append({**kw, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            print(t, row["configs"][-1], flush=True)
        print(json.dumps({k: v for k, v in row.items() if k != "configs"}), flush=True)
        rows.append(row)
    meta = {"command": "python3 -m experiments.prefill_mass_sweep " + " ".join(f"--lengths {x}" for x in args.lengths),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
