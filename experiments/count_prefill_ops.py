"""Host work of each method's prefill: the aten ops one prompt forward dispatches (a
TorchDispatchMode sees every op the GPU would launch) and the host reads of device values
(item / bool / nonzero / tolist), per decoder layer beyond a DynamicCache prefill. On the GPU
each op costs ~5-10 us of host time whatever its size and each read drains the queue, which is
what makes a short prompt's prefill host-bound:

    python -m experiments.count_prefill_ops --length 1024 --methods zipkv,snapkv,h2o,zipvl --top 25
    python -m experiments.count_prefill_ops --device cuda --length 8192 --out OUT.json   # the GPU's routing
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default", "tolist"}


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
    tolist = torch.Tensor.tolist
    with torch.inference_mode(), OpCounter() as counter:
        def counted(t):  # tolist is not an op: count its device reads by hand
            counter.ops["tolist"] += t.device.type != "cpu" or ids.device.type == "cpu"
            return tolist(t)
        torch.Tensor.tolist = counted
        try:
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **zipkv.cache_kwargs(cache))
        finally:
            torch.Tensor.tolist = tolist
    return counter.ops


def per_layer_extra(ops, base, layers: int, top: int) -> dict:
    extra = {k: (v - base.get(k, 0)) / layers for k, v in ops.items() if v != base.get(k, 0)}
    return {"extra_ops_per_layer": (sum(ops.values()) - sum(base.values())) / layers,
            "reads_per_layer": sum(v for k, v in extra.items() if k in READS),
            "top": dict(sorted(extra.items(), key=lambda kv: -kv[1])[:top])}


def main(argv=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--methods", default="zipkv,snapkv,h2o,zipvl")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # Llama-3-8B's head layout (32 / 8 heads of 128) on a narrow model: the ops are what matter
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=1000,
                         max_position_embeddings=131072, rope_theta=500000.0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = LlamaForCausalLM(config).to(args.device, dtype).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    count("dynamic", model, ids)  # warm-up: autotuning and lazy imports are not the prefill's ops
    base = count("dynamic", model, ids)
    report = {"length": args.length, "layers": args.layers, "device": args.device, "methods": {}}
    for method in args.methods.split(","):
        count(method, model, ids)
        row = report["methods"][method] = per_layer_extra(count(method, model, ids), base, args.layers, args.top)
        print(f"{method}: {row['extra_ops_per_layer']:.0f} extra ops a layer, {row['reads_per_layer']:.0f} host reads")
        for name, n in row["top"].items():
            print(f"    {n:7.1f}  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
