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


def main():
    import transformers
    import zipkv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shapes", default="1x32768,8x8192")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--methods", default="dynamic,snapkv,zipkv")
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
                             else zipkv.make_cache(method, model.config))
                    clock = StepClock(device)
                    with torch.inference_mode():
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                       do_sample=False, logits_processor=[clock], **zipkv.cache_kwargs(cache))
                    times = clock.intervals_ms()[4:]
                    del cache
                row["ms_per_step"] = round(statistics.median(times), 3)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
