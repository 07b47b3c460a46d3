"""Kernel benchmarks on the GPU; writes JSON (with the exact command and device) and plots.

python -m benchmarks.kernel_bench --stages check,ceiling,sweep,grid [--out DIR]

Stages:
  check    kernels vs their float32 references on the GPU
  ceiling  device-to-device copy bandwidth (bytes read + written), the roofline for all GB/s
  sweep    decode kernel tuning variants at 32K x batch 8 (ZipCache 4/2)
  grid     decode: fp16 SDPA vs packed caches, contexts x batches, Llama-3-8B heads
  quant    fused quantize+pack vs the PyTorch reference (GB/s)
  probe    probe saliency vs one Llama-3-8B layer's prefill at 8K and 32K
  sparse   ZipVL sparse prefill: gather+SDPA and the Triton kernel vs dense SDPA at 32K
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

from zipkv.bench_cli import add_kernel_bench_arguments


DEFAULT_SWEEP = [
    dict(block_n=64, num_warps=8),
    dict(block_n=64, num_warps=4),
    dict(block_n=32, num_warps=4),
    dict(block_n=128, num_warps=8),
    dict(block_n=64, num_warps=8, num_stages=2),
    dict(block_n=64, num_warps=8, programs_per_sm=4),
    dict(block_n=64, num_warps=8, programs_per_sm=16),
    dict(block_n=64, num_warps=4, maxnreg=128),
    dict(block_n=32, num_warps=2),
    dict(block_n=64, num_warps=8, use_asm=False),
]


def device_info():
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mb=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
    return info


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_bench_arguments(ap)
    return ap.parse_args(argv)


def run(args) -> dict:
    from benchmarks import bench_decode as bd
    from benchmarks import bench_misc

    os.makedirs(args.out, exist_ok=True)
    stages = [s for s in args.stages.split(",") if s]
    command = os.environ.get("ZIPKV_BENCH_COMMAND") or " ".join(  # set by `zipkv bench`
        [os.path.basename(sys.executable), "-m", "benchmarks.kernel_bench"] + sys.argv[1:])
    res = {"command": command,
           "device": device_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": stages}
    path = os.path.join(args.out, f"{args.tag}.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    heads = bd.llama3_8b_heads()
    if "check" in stages:
        try:
            res["check_decode"] = bd.check_decode()
        except Exception:
            res["check_decode_error"] = traceback.format_exc()
        for extra in ("check_quantize_pack", "check_probe", "check_sparse"):
            fn = getattr(bench_misc, extra)
            if fn is not None:
                try:
                    res[extra] = fn()
                except Exception:
                    res[extra + "_error"] = traceback.format_exc()
        print("check:", json.dumps({k: v for k, v in res.items() if k.startswith("check")}, indent=1), flush=True)
        save()
    if "ceiling" in stages:
        from benchmarks.timing import copy_ceiling

        res["copy_ceiling"] = copy_ceiling()
        print(f"copy ceiling {res['copy_ceiling']['gbps']:.0f} GB/s", flush=True)
        save()
    best = json.loads(args.tuning) if args.tuning else None
    if "sweep" in stages:
        variants = json.loads(args.sweep) if args.sweep else DEFAULT_SWEEP
        res["sweep"] = []
        for v in variants:
            try:
                t = bd.bench_packed("zipcache42", 8, heads["hq"], heads["hkv"], 32768, heads["d"], reps=args.reps, **v)
                rec = dict(tuning=v, **t)
            except Exception as e:  # a variant that fails to compile must not end the run
                rec = dict(tuning=v, error=repr(e)[:500])
            res["sweep"].append(rec)
            print("sweep", v, f"{rec.get('ms', float('nan')):.4f} ms {rec.get('gbps', 0):.0f} GB/s", flush=True)
            save()
        ok = [r for r in res["sweep"] if "ms" in r]
        if ok and best is None:
            best = min(ok, key=lambda r: r["ms"])["tuning"]
    if "grid" in stages:
        best = best or {}
        res["grid_tuning"] = best
        res["grid"] = []
        for n in map(int, args.contexts.split(",")):
            for b in map(int, args.batches.split(",")):
                row = {"context": n, "batch": b}
                try:
                    row["sdpa_fp16"] = bd.bench_sdpa(b, heads["hq"], heads["hkv"], n, heads["d"], reps=args.reps)
                except Exception as e:
                    row["sdpa_fp16"] = {"error": repr(e)[:300]}
                for recipe in args.recipes.split(","):
                    try:
                        row[recipe] = bd.bench_packed(recipe, b, heads["hq"], heads["hkv"], n, heads["d"],
                                                      reps=args.reps, **best)
                    except Exception as e:
                        row[recipe] = {"error": repr(e)[:300]}
                res["grid"].append(row)
                save()
                print(_grid_line(row, args.recipes.split(",")), flush=True)
    for stage, fn in (("quant", bench_misc.bench_quantize), ("probe", bench_misc.bench_probe),
                      ("sparse", bench_misc.bench_sparse)):
        if stage in stages:
            try:
                res[stage] = fn()
            except Exception:
                res[stage + "_error"] = traceback.format_exc()
            print(stage, json.dumps(res.get(stage, res.get(stage + "_error")), indent=0), flush=True)
            save()
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    if res.get("grid"):
        try:
            from benchmarks.plot_decode import plot

            plot(res, os.path.join(args.out, f"{args.tag}.png"))
        except Exception:
            traceback.print_exc()
    print_summary(res, args.recipes.split(","))
    return res


def _grid_line(row, recipes):
    s = row["sdpa_fp16"]
    parts = [f"N={row['context']:>6} B={row['batch']:>2} sdpa {s.get('ms', float('nan')):.4f} ms {s.get('gbps', 0):5.0f} GB/s"]
    for r in recipes:
        t = row.get(r, {})
        if "ms" in t:
            parts.append(f"{r} {t['ms']:.4f} ms {t['gbps']:5.0f} GB/s x{s.get('ms', float('nan')) / t['ms']:.2f}")
        else:
            parts.append(f"{r} ERR")
    return " | ".join(parts)


def print_summary(res, recipes):
    print("\n==== summary ====")
    print("device:", res["device"])
    if "copy_ceiling" in res:
        print(f"copy ceiling: {res['copy_ceiling']['gbps']:.0f} GB/s")
    for k, v in res.items():
        if k.startswith("check") and isinstance(v, list):
            for c in v:
                print(k, c)
    if res.get("grid_tuning") is not None:
        print("grid tuning:", res["grid_tuning"])
    for row in res.get("grid", []):
        print(_grid_line(row, recipes))


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
