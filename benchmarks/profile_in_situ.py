"""One layer of a real zipkv cache at 8 x 32K (Llama-3-8B heads), decode attention profiled:
the tiers it holds, then either a torch.profiler table of the kernels of one decode step
(default) or plain repeated calls for Nsight Compute (--plain).

    python -m benchmarks.profile_in_situ --method zipcache [--static] [--tuning JSON]
    ncu -k regex:zipkv_mma --launch-skip 4 -c 2 --set full python -m benchmarks.profile_in_situ --plain
"""

from __future__ import annotations

import argparse
import json
import types

import torch

from benchmarks.e2e_decode import LLAMA3_8B, fill
from zipkv.kernels.decode_attention import decode_attention
from zipkv.kernels.packed import as_segment


def main(argv=None):
    from transformers import LlamaConfig

    import zipkv

    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="zipcache")
    ap.add_argument("--static", action="store_true", help="the CUDA-graph layout (capacity buffers + lengths)")
    ap.add_argument("--tuning", default="{}")
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    tuning = json.loads(args.tuning)
    config = LlamaConfig(**dict(LLAMA3_8B, num_hidden_layers=1))
    config._attn_implementation = "sdpa"
    cache = zipkv.make_cache(args.method, config, decode_path="packed")
    with torch.inference_mode():
        fill("zip_packed", cache, types.SimpleNamespace(config=config), args.batch, args.context, args.device,
             torch.bfloat16)
        if args.static:
            cache.to_static(512)
        layer = cache.layers[0]  # to_static replaces the layers
        if args.static:
            segs, kw, vw, lens = [t.segment() for t in layer.attended], layer.k_win, layer.v_win, layer.lengths
        else:
            segs = [as_segment(t) for t in layer.tiers() if t.num_tokens]
            kw, vw, lens = layer.keys, layer.values, None
    for s in segs:
        print(f"tier bits {s.bits}/{s.value_bits} tokens {s.num_tokens} groups {s.k_scale.shape[2]} "
              f"chunks {None if s.v_channel is None else s.v_channel.shape[2]} MB {s.nbytes() / 1e6:.1f}")
    print("fp16 part tokens", kw.shape[2] if kw is not None else 0)
    q = torch.randn(args.batch, 32, 1, 128, device=args.device, dtype=torch.bfloat16)

    def step():
        return decode_attention(q, segs, kw, vw, impl="triton" if args.device == "cuda" else "reference",
                                lengths=lens, **tuning)

    for _ in range(3):
        step()
    if args.device != "cuda":
        return
    torch.cuda.synchronize()
    if args.plain:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
