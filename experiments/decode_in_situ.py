"""Why is the decode kernel slower inside the model than in kernel_bench? (issue 6)

Times decode_attention on the cache the end-to-end benchmark builds (zipkv fill of random
K/V through the layers' own policy, bf16, Llama-3-8B heads, 4 layers rotated so nothing is
timed from L2), next to kernel_bench's synthetic recipe at the same shape in fp16 and bf16,
and the static (capacity + device lengths) form of the same cache.

    python -m experiments.decode_in_situ --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import types

import torch

from benchmarks.e2e_decode import LLAMA3_8B, fill
from benchmarks.bench_decode import make_cache as synthetic_cache
from zipkv.kernels.decode_attention import decode_attention
from zipkv.kernels.packed import as_segment
from benchmarks.timing import time_calls


def main(argv=None):
    from transformers import LlamaConfig

    import zipkv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    config = LlamaConfig(**dict(LLAMA3_8B, num_hidden_layers=args.layers))
    config._attn_implementation = "sdpa"
    holder = types.SimpleNamespace(config=config)
    b, n = args.batch, args.context
    rows = []

    def run(name, sets, qdtype, **tuning):
        qs = [torch.randn(b, 32, 1, 128, device=dev, dtype=qdtype) for _ in sets]
        calls = [lambda s=s, q=q: decode_attention(q, s[0], s[1], s[2], impl="triton", lengths=s[3], **tuning)
                 for s, q in zip(sets, qs)]
        t = time_calls(calls, reps=15)
        nbytes = sum(sum(x.nbytes() for x in s[0]) + 2 * s[1].numel() * s[1].element_size() for s in sets) / len(sets)
        rows.append({"case": name, "tuning": tuning, "ms": t["ms"], "gbps_of_held": nbytes / (t["ms"] * 1e-3) / 1e9})
        print(f"{name:44s} {json.dumps(tuning):40s} {t['ms']:.3f} ms", flush=True)

    for dtype in (torch.float16, torch.bfloat16):
        sets = [(*synthetic_cache("zipcache42", b, 8, n, 128, dtype=dtype), None) for _ in range(args.layers)]
        run(f"synthetic zipcache42 {dtype}", sets, dtype)
        del sets
    for method in ("zipcache", "kivi", "zipkv"):
        cache = zipkv.make_cache(method, config, decode_path="packed")
        with torch.inference_mode():
            fill("zip_packed", cache, holder, b, n, dev, torch.bfloat16)
        layers = cache.layers
        eager = [([as_segment(t) for t in layer.tiers() if t.num_tokens], layer.keys, layer.values, None)
                 for layer in layers]
        desc = [[(s.bits, s.num_tokens, s.k_scale.shape[2], None if s.v_channel is None else s.v_channel.shape[2],
                  s.v_scale.shape[-1], s.k_codes.is_contiguous()) for s in e[0]] for e in eager[:1]]
        print(method, "layer 0 segments (bits, tokens, key groups, value chunks, value groups, contiguous):", desc)
        for tuning in ({}, {"programs_per_sm": 8}, {"programs_per_sm": 16}, {"block_n": 128}):
            run(f"in situ {method} eager", eager, torch.bfloat16, **tuning)
        del eager
        with torch.inference_mode():
            cache.to_static(512)
        static = [([t.segment() for t in layer.attended], layer.k_win, layer.v_win, layer.lengths) for layer in cache.layers]
        run(f"in situ {method} static", static, torch.bfloat16)
        del static, cache, layers
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "decode_in_situ.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "batch": b, "context": n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
