"""Where each method's prefill time goes: one Llama-3-8B-shaped model (random bf16, --layers of
its 32), one profiled prefill per method at one length after an untimed one, the top CUDA
kernels by total time and the wall time against DynamicCache's:

    python3 -m experiments.profile_prefill --out OUT.json --length 8192 --layers 4 \
        --methods dynamic,snapkv,h2o,zipvl,zipkv
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from benchmarks import e2e_decode as e2e
from benchmarks.headline_prefill import new_prefill_cache


def prefill(model, method, ids):
    import zipkv

    cache = new_prefill_cache(method, model)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **zipkv.cache_kwargs(cache))
    return cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--methods", default="dynamic,snapkv,h2o,zipvl,zipkv")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model, _ = e2e.build_model(SimpleNamespace(tiny=False, layers=args.layers, dtype="bfloat16"), device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device=device)
    report = {"length": args.length, "layers": args.layers, "methods": {}}
    for method in args.methods.split(","):
        prefill(model, method, ids)  # compile / autotune
        sync()
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            prefill(model, method, ids)
            sync()
            walls.append(time.perf_counter() - t0)
        with torch.profiler.profile(activities=activities) as prof:
            prefill(model, method, ids)
            sync()
        kernels = sorted(((e.key, e.self_device_time_total / 1e3, e.count) for e in prof.key_averages()
                          if getattr(e, "self_device_time_total", 0) > 0), key=lambda r: -r[1])
        gpu_ms = sum(ms for _, ms, _ in kernels)
        report["methods"][method] = {"wall_ms": sorted(walls)[1] * 1e3, "gpu_kernel_ms": gpu_ms,
                                     "top": [{"kernel": k[:120], "ms": ms, "calls": n} for k, ms, n in kernels[:args.top]]}
        print(f"== {method}: wall {sorted(walls)[1] * 1e3:.1f} ms, kernels {gpu_ms:.1f} ms")
        for k, ms, n in kernels[:args.top]:
            print(f"  {ms:9.2f} ms {n:6d}x  {k[:110]}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
