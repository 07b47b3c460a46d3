"""An evicting layer's eager decode attention, three forms: the repeated-heads reference
(cache/eviction_layer.repeated_masked_attention, the product form before), the query heads
folded onto their KV head (a query of groups x q rows; tried first, kept here) and SDPA's own
enable_gqa with the mask (cache/eviction_layer.masked_attention now; a per-KV-head mask
repeated per query head): ms per call (CUDA events, median of --reps) and
the largest difference, at Llama-3-8B heads (32 query / 8 KV, 128 wide), bf16, one query token.

    python3 -m experiments.sdpa_folded_decode --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from zipkv.cache.eviction_layer import masked_attention, repeated_masked_attention


def folded_masked_attention(query, key, value, mask, scaling):
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    folded = query.reshape(batch, key.shape[1], groups * length, dim)
    rows = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(mask.shape[0], mask.shape[1], groups * length,
                                                                     mask.shape[-1])
    return F.scaled_dot_product_attention(folded, key, value, attn_mask=rows, scale=scaling).reshape(query.shape)


def time_ms(fn, reps):
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[2:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="1x4096,8x4096,1x32768,8x32768")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        batch, length = map(int, shape.split("x"))
        q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for heads in (1, 8):
            mask = torch.rand(batch, heads, 1, length, device="cuda") < 0.9
            ref = repeated_masked_attention(q, k, v, mask, 128 ** -0.5)
            row = {"batch": batch, "context": length, "mask_heads": heads}
            variants = {"repeated": repeated_masked_attention, "folded": folded_masked_attention,
                        "sdpa_enable_gqa": masked_attention}
            for name, fn in variants.items():
                try:
                    out = fn(q, k, v, mask, 128 ** -0.5)
                    row[f"{name}_max_diff"] = float((out.float() - ref.float()).abs().max())
                    row[f"{name}_ms"] = round(time_ms(lambda: fn(q, k, v, mask, 128 ** -0.5), args.reps), 4)
                except Exception as error:  # e.g. a backend refusing the combination
                    row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
