"""Host work of each method's prefill, counted on the CPU: the aten ops one prompt forward
dispatches (a TorchDispatchMode sees every op the GPU would launch or sync on) and the host
reads of device values (item / tolist / bool / nonzero), per decoder layer beyond a
DynamicCache prefill. On the GPU each op costs ~5-10 us of host time whatever its size, which is
what makes a short prompt's prefill host-bound:

    python -m experiments.count_prefill_ops --length 1024 --methods zipkv,snapkv,h2o,zipvl --top 25
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(method: str, model, ids) -> collections.Counter:
    import zipkv
    from benchmarks.headline_prefill import new_prefill_cache

    cache = new_prefill_cache(method, model)
    with torch.inference_mode(), OpCounter() as counter:
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **zipkv.cache_kwargs(cache))
    return counter.ops


def main(argv=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--methods", default="zipkv,snapkv,h2o,zipvl")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # Llama-3-8B's head layout (32 / 8 heads of 128) on a narrow model: the ops are what matter
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=1000,
                         max_position_embeddings=131072, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    base = count("dynamic", model, ids)
    report = {"length": args.length, "layers": args.layers, "methods": {}}
    for method in args.methods.split(","):
        ops = count(method, model, ids)
        extra = {k: (v - base.get(k, 0)) / args.layers for k, v in ops.items() if v != base.get(k, 0)}
        total = (sum(ops.values()) - sum(base.values())) / args.layers
        syncs = sum(v for k, v in extra.items() if k in SYNC_OPS)
        report["methods"][method] = {"extra_ops_per_layer": total, "syncs_per_layer": syncs,
                                     "top": dict(sorted(extra.items(), key=lambda kv: -kv[1])[:args.top])}
        print(f"{method}: {total:.0f} extra ops a layer, {syncs:.0f} host reads")
        for k, v in sorted(extra.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"    {v:7.1f}  {k}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
