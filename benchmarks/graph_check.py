"""GPU check of CUDA-graph decoding (zipkv.greedy_decode) on a small random Llama, bf16.

For each preset: greedy tokens with graphs, the same static path without graphs (must be
identical: same kernels, same buffers), and model.generate with the eager cache on the packed
path (the kernel with host-side counts and another split plan: float rounding may differ).
Prints one row per case and writes JSON to --out.

    python -m benchmarks.graph_check --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def small_llama(device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         eos_token_id=None)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


def main(argv=None):
    import zipkv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    ap.add_argument("--new", type=int, default=150)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    model = small_llama(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (3, 700), generator=g).to(device)
    mask = torch.ones_like(ids)
    ids[2, :37], mask[2, :37] = 0, 0  # a left-padded row
    rows = []
    for method, kw in [("zipcache", dict(stream_interval=32, residual_length=16)), ("kivi", {}),
                       ("zipcache", dict(sink_tokens=4, stream_interval=24)), ("uniform", dict(bits=4))]:
        rec = {"method": method, **kw}
        try:
            t = time.perf_counter()
            graph = zipkv.greedy_decode(model, zipkv.make_cache(method, model.config, decode_path="packed", **kw),
                                        ids, mask, max_new_tokens=args.new, cuda_graph=True, eos_token_id=False)
            torch.cuda.synchronize()
            rec["graph_s"] = time.perf_counter() - t
            eager_static = zipkv.greedy_decode(model, zipkv.make_cache(method, model.config, decode_path="packed", **kw),
                                               ids, mask, max_new_tokens=args.new, cuda_graph=False, eos_token_id=False)
            cache = zipkv.make_cache(method, model.config, decode_path="packed", **kw)
            with torch.inference_mode():
                generated = model.generate(input_ids=ids, attention_mask=mask, **zipkv.cache_kwargs(cache), do_sample=False,
                                           max_new_tokens=args.new, min_new_tokens=args.new)[:, ids.shape[1]:]
            rec["graph_equals_static_eager"] = bool((graph == eager_static).all())
            same = (graph == generated).float()
            rec["agree_with_generate"] = same.mean().item()
            first_diff = [(row != 1).nonzero()[0].item() if (row != 1).any() else None for row in same]
            rec["first_difference_per_row"] = first_diff
        except Exception as error:  # report and go on
            import traceback

            rec["error"] = repr(error)[:300]
            rec["traceback"] = traceback.format_exc()[-2500:]
        rows.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "traceback"}), flush=True)
        if "traceback" in rec:
            print(rec["traceback"], flush=True)
    with open(os.path.join(args.out, "graph_check.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
