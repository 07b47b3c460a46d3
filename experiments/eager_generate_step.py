"""ms per decode step of plain `model.generate(past_key_values=cache)` with eager caches (what a
user gets without static_for_generate): a prompt of random tokens, then --new greedy steps,
the median interval between logits-processor calls after the first 4 (CUDA events), on the
Llama-3-8B-shaped model (random bf16, --layers of 32). Issue 19 measured 33 ms for DynamicCache
and 60 ms for SnapKV 20% at 1 x 32K, when an evicting layer's decode repeated K / V per query
head.

    python3 -m experiments.eager_generate_step --out OUT.json --shapes 1x32768,8x8192 --methods dynamic,snapkv,zipkv
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.compiled_check import llama3_8b_shapes
from benchmarks.headline_rows import StepClock


PARAMS = {"snapkv": dict(ratio=0.2), "h2o": dict(ratio=0.2), "zipvl": {}}


def profile_steps(model, method, ids, new):
    """One more generate() under the profiler: per decode step, the top CUDA kernels and CPU ops
    and the host syncs (cudaStreamSynchronize / D2H copies), the prompt's share removed by
    profiling a one-token generate() too."""
    import transformers
    import zipkv

    def once(n):
        cache = (transformers.DynamicCache(config=model.config) if method == "dynamic"
                 else zipkv.make_cache(method, model.config, **PARAMS.get(method, {})))
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof, torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           **zipkv.cache_kwargs(cache))
            torch.cuda.synchronize()
        return {e.key: (e.self_device_time_total / 1e3, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}

    short, full = once(1), once(new + 1)
    rows = []
    for key, (dev, cpu, count) in full.items():
        d0, c0, n0 = short.get(key, (0, 0, 0))
        rows.append((key[:90], round((dev - d0) / new, 4), round((cpu - c0) / new, 4), round((count - n0) / new, 2)))
    return {"top_gpu_ms_per_step": sorted(rows, key=lambda r: -r[1])[:15],
            "top_cpu_ms_per_step": sorted(rows, key=lambda r: -r[2])[:15],
            "calls_per_step": sorted(rows, key=lambda r: -r[3])[:15]}


def main():
    import transformers
    import zipkv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shapes", default="1x32768,8x8192")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--methods", default="dynamic,snapkv,zipkv")
    ap.add_argument("--profile", default="", help="methods also profiled per step at the first shape")
    args = ap.parse_args()
    device = torch.device("cuda")
    model = llama3_8b_shapes(device, args.layers)
    rows = []
    for shape in args.shapes.split(","):
        batch, length = map(int, shape.split("x"))
        ids = torch.randint(3, 128000, (batch, length), device=device)
        for method in args.methods.split(","):
            row = {"method": method, "batch": batch, "context": length}
            try:
                times = []
                for _ in range(2):  # the first call warms kernels and autotuning
                    cache = (transformers.DynamicCache(config=model.config) if method == "dynamic"
                             else zipkv.make_cache(method, model.config, **PARAMS.get(method, {})))
                    clock = StepClock(device)
                    with torch.inference_mode():
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                       do_sample=False, logits_processor=[clock], **zipkv.cache_kwargs(cache))
                    times = clock.intervals_ms()[4:]
                    del cache
                row["ms_per_step"] = round(statistics.median(times), 3)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            if method in args.profile.split(",") and shape == args.shapes.split(",")[0]:
                row["profile"] = profile_steps(model, method, ids, 8)
            torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
            if "profile" in row:
                for r in row["profile"]["top_cpu_ms_per_step"][:10] + row["profile"]["top_gpu_ms_per_step"][:6]:
                    print("   ", r)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
