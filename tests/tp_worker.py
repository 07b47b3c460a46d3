"""One rank of the tensor-parallel tests (tests/test_parallel.py): load the tiny model saved in
`model_dir` with transformers' tp_plan="auto" (gloo on CPU), decode greedily with each method's
zipkv cache and write the tokens and the sharded byte figures to `out_dir/rank{r}.json`."""

from __future__ import annotations

import json
import os
import socket
import sys

import torch

METHODS = {  # the tests' methods and settings: lossless, quantizing, evicting (rows and head-wise), tiered
    "full": {}, "zipkv": {}, "kivi": {}, "zipcache": {}, "snapkv": {"budget": 40}, "adakv": {"budget": 40},
    "cake": {"budget": 40}, "zipvl": {}, "zipvl_v2": {"budget": 40},
}
PROMPT, PAD, NEW_TOKENS = 64, 5, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_all(model, make) -> dict:
    """{method: {"tokens", "bytes", "sharded", ...}} with the cache `make(method, **settings)` builds."""
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_models import padded_batch

    from zipkv.parallel import sharded_stats, split_bytes

    ids, mask = padded_batch(PROMPT, PAD)
    out = {}
    for method, settings in METHODS.items():
        cache = make(method, **settings)
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=NEW_TOKENS,
                                    do_sample=False)[:, PROMPT:]
        sharded, bookkeeping = split_bytes(cache)
        out[method] = {"tokens": tokens.tolist(), "bytes": cache.stats().bytes_held, "sharded": sharded,
                       "bookkeeping": bookkeeping, "tp": sharded_stats(cache).to_dict()}
    return out


def run_rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from zipkv.parallel import head_shard_of_model, make_tp_cache

    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    attention = model.model.layers[0].self_attn
    local_kv = attention.k_proj.weight.to_local().shape[0] // attention.head_dim
    result = {"local_kv_heads": local_kv, "config_kv_heads": model.config.num_key_value_heads,
              "shard": vars(head_shard_of_model(model)) | {"group": None},
              "methods": decode_all(model, lambda method, **s: make_tp_cache(method, model, **s))}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
