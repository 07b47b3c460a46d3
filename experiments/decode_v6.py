"""v6 check + timing in one device call: v5 (default) vs v6 (dequant=True: fp16 dequantization
in registers before the tensor-core dots) on the real shapes (experiments/NOTES.md, "v6").

1. correctness on the GPU, fresh random quantized data vs the float32 reference (both variants;
   the three check_decode layouts, plus the static (capacity + device lengths) e2e caches);
2. copy ceiling; 3. timings: kernel_bench's synthetic recipes and decode_in_situ's e2e caches
   (zipcache / kivi / zipkv at 8 x 32K, eager and static), medians of CUDA-graph replays with
   inputs rotated (4 layers >= 256 MB), the variants interleaved case by case.

    PYTHONUNBUFFERED=1 python -m experiments.decode_v6 --out $OUT [--variants JSON] [--deadline-s 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch

from benchmarks.e2e_decode import LLAMA3_8B, fill
from benchmarks.kernel_bench import device_info
from benchmarks import bench_decode as bd
from zipkv.kernels.decode_attention import decode_attention
from zipkv.kernels.packed import as_segment
from benchmarks.timing import copy_ceiling, time_calls

DEFAULT_VARIANTS = {"v5": {"dequant": False}, "v6": {"dequant": True}}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None):
    from transformers import LlamaConfig

    import zipkv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--variants", default="")
    ap.add_argument("--deadline-s", type=float, default=200)
    ap.add_argument("--methods", default="zipcache,kivi,zipkv")
    ap.add_argument("--tag", default="v6")
    ap.add_argument("--recipes", default="zipcache42,kivi2")
    ap.add_argument("--sdpa", action="store_true", help="time bf16 SDPA decode (enable_gqa) at 8 x 32K too")
    args = ap.parse_args(argv)
    t0 = time.time()
    variants = json.loads(args.variants) if args.variants else DEFAULT_VARIANTS
    dev = torch.device("cuda")
    res = {"command": " ".join(["python", "-m", "experiments.decode_v6"] + sys.argv[1:]), "device": device_info(),
           "variants": variants, "checks": [], "rows": []}
    path = os.path.join(args.out, f"{args.tag}.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    for name, tuning in variants.items():
        for c in bd.check_decode(**tuning):
            c["variant"] = name
            res["checks"].append(c)
            print("check", name, c, flush=True)
    res["copy_ceiling"] = copy_ceiling()
    print(f"copy ceiling {res['copy_ceiling']['gbps']:.0f} GB/s", flush=True)
    save()

    b, n = 8, 32768

    def run(case, sets, qdtype, nbytes):
        qs = [torch.randn(b, 32, 1, 128, device=dev, dtype=qdtype) for _ in sets]
        for name, tuning in variants.items():
            if time.time() - t0 > args.deadline_s:
                print("deadline: skipping", case, name, flush=True)
                continue
            calls = [lambda s=s, q=q, t=tuning: decode_attention(q, s[0], s[1], s[2], impl="triton", lengths=s[3], **t)
                     for s, q in zip(sets, qs)]
            t = time_calls(calls, reps=15)
            launch = {}  # registers and grids, from one more call asked to describe its launches
            s0 = sets[0]
            decode_attention(qs[0], s0[0], s0[1], s0[2], impl="triton", lengths=s0[3], record=launch, **tuning)
            last = (launch.get("triton") or [{}])[-1]
            row = {"case": case, "variant": name, "tuning": tuning, "ms": t["ms"], "min_ms": t["min_ms"],
                   "max_ms": t["max_ms"], "gbps": nbytes / (t["ms"] * 1e-3) / 1e9, "launch": launch}
            res["rows"].append(row)
            print(f"{case:34s} {name:10s} {t['ms']:.4f} ms {row['gbps']:5.0f} GB/s regs {last.get('n_regs')} "
                  f"spills {last.get('n_spills')}", flush=True)
            save()

    if args.sdpa:
        t = bd.bench_sdpa(b, 32, 8, n, 128, dtype=torch.bfloat16, reps=15)
        res["rows"].append({"case": "sdpa bf16 (enable_gqa)", "variant": "sdpa", "ms": t["ms"], "min_ms": t["min_ms"],
                            "max_ms": t["max_ms"], "gbps": t["gbps"]})
        print(f"sdpa bf16 8 x 32K {t['ms']:.4f} ms {t['gbps']:.0f} GB/s", flush=True)
        save()
    for recipe in args.recipes.split(","):
        dtype = torch.bfloat16
        sets = [(*bd.make_cache(recipe, b, 8, n, 128, dtype=dtype), None) for _ in range(4)]
        run(f"synthetic {recipe} bf16", sets, dtype, bd.cache_bytes(*sets[0][:3]))
        del sets
        torch.cuda.empty_cache()

    config = LlamaConfig(**dict(LLAMA3_8B, num_hidden_layers=4))
    config._attn_implementation = "sdpa"
    holder = types.SimpleNamespace(config=config)
    for method in args.methods.split(","):
        if time.time() - t0 > args.deadline_s:
            print("deadline: skipping", method, flush=True)
            break
        cache = zipkv.make_cache(method, config, decode_path="packed")
        with torch.inference_mode():
            fill("zip_packed", cache, holder, b, n, dev, torch.bfloat16)
        eager = [([as_segment(t) for t in layer.tiers() if t.num_tokens], layer.keys, layer.values, None)
                 for layer in cache.layers]
        nbytes = sum(s.nbytes() for s in eager[0][0]) + 2 * eager[0][1].numel() * eager[0][1].element_size()
        run(f"in situ {method} eager", eager, torch.bfloat16, nbytes)
        del eager
        with torch.inference_mode():
            cache.to_static(512)
        static = [([t.segment() for t in layer.attended], layer.k_win, layer.v_win, layer.lengths)
                  for layer in cache.layers]
        # correctness of the lengths= path on the real cache: each variant vs the reference
        segs, kw, vw, lens = static[0]
        q = torch.randn(b, 32, 1, 128, device=dev, dtype=torch.bfloat16)
        ref = decode_attention(q, segs, kw, vw, impl="reference", lengths=lens)
        for name, tuning in variants.items():
            out = decode_attention(q, segs, kw, vw, impl="triton", lengths=lens, **tuning)
            c = {"case": f"in situ {method} static (lengths)", "variant": name, "rel_err": rel(out, ref),
                 "finite": bool(torch.isfinite(out).all())}
            c["ok"] = c["finite"] and c["rel_err"] < 1e-2
            res["checks"].append(c)
            print("check", c, flush=True)
        run(f"in situ {method} static", static, torch.bfloat16, nbytes)
        del static, cache, ref
        torch.cuda.empty_cache()
    res["elapsed_s"] = time.time() - t0
    save()
    print(f"\n==== {args.tag} summary ====")
    print("device:", res["device"].get("gpu"), "copy ceiling", round(res["copy_ceiling"]["gbps"]), "GB/s")
    print("checks ok:", all(c["ok"] for c in res["checks"]),
          "max rel err per variant:", {v: max(c["rel_err"] for c in res["checks"] if c["variant"] == v) for v in variants})
    cases = list(dict.fromkeys(r["case"] for r in res["rows"]))
    variants = dict(variants, sdpa=None)
    print(f"{'case':34s} " + " ".join(f"{v:>10s}" for v in variants))
    for case in cases:
        ms = {r["variant"]: r["ms"] for r in res["rows"] if r["case"] == case}
        print(f"{case:34s} " + " ".join(f"{ms.get(v, float('nan')):10.4f}" for v in variants))


if __name__ == "__main__":
    main()
