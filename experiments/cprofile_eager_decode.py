"""Where an eager decode step's host time goes (issue 19: plain generate() with the zipkv preset
took 3.1x DynamicCache's step at 8 x 8K on the H200, with no device reads; SnapKV 2.2x with ~one
device copy a layer a step). Python's cProfile over --steps eager one-token forwards after a
prompt, per method: ms per step (wall, synchronized at the end) and the top functions by own
time and by cumulative time, written as text beside the JSON.

    python3 -m experiments.cprofile_eager_decode --out OUT_DIR --layers 8 --batch 8 --context 8192
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch

from benchmarks.compiled_check import llama3_8b_shapes
from experiments.eager_generate_step import PARAMS


def new_cache(method, config):
    import transformers
    import zipkv

    if method == "dynamic":
        return transformers.DynamicCache(config=config)
    return zipkv.make_cache(method, config, **PARAMS.get(method, {}))


def decode(model, cache, ids, steps, profiler=None):
    import zipkv

    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **zipkv.cache_kwargs(cache))
        token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        for _ in range(steps):
            mask = torch.cat([mask, mask[:, :1]], dim=1)
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **zipkv.cache_kwargs(cache))
            token = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        if profiler is not None:
            profiler.disable()
    return (time.perf_counter() - start) * 1e3 / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder for the JSON and one text profile per method")
    ap.add_argument("--methods", default="dynamic,zipkv,snapkv")
    for name, default in (("layers", 8), ("batch", 8), ("context", 8192), ("steps", 24)):
        ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args()
    model = llama3_8b_shapes(torch.device("cuda"), args.layers)
    ids = torch.randint(3, 128000, (args.batch, args.context), device="cuda")
    report = {"layers": args.layers, "batch": args.batch, "context": args.context, "steps": args.steps, "methods": {}}
    for method in args.methods.split(","):
        decode(model, new_cache(method, model.config), ids, 4)  # warm kernels and autotuning
        plain = decode(model, new_cache(method, model.config), ids, args.steps)
        profiler = cProfile.Profile()
        cache = new_cache(method, model.config)
        profiled = decode(model, cache, ids, args.steps, profiler)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
        with open(os.path.join(args.out, f"cprofile_eager_decode_{method}.txt"), "w") as f:
            f.write(text.getvalue())
        report["methods"][method] = {"ms_per_step": round(plain, 3), "ms_per_step_profiled": round(profiled, 3)}
        print(method, report["methods"][method], flush=True)
        del cache
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "cprofile_eager_decode.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
