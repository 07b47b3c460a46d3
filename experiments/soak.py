"""Soak on the embedded model (issue 21): sequential prompts of --tokens tokens, a fresh cache
per prompt (prefill + --decode-steps greedy steps as direct forwards), with grad enabled and
under no_grad, per registry method. Nothing of one prompt may stay for the next: after each
prompt it records whether the cache outlived its last reference (a weak reference, checked
before the cyclic collector runs), the live tensor count, the process's current and peak
RSS, and on CUDA the allocated bytes. The summary gives each figure's growth from prompt
--warm to the last one (the first prompts warm memo tables and the allocator).

    nice -n 10 python -m experiments.soak --methods zipkv snapkv --prompts 50 --tokens 2048
    python -m experiments.soak --device cuda --methods zipkv kivi   # allocated bytes too

Writes results/soak/<method>.json (--out to change). The tiny-model version is the test
tests/test_soak.py; on CUDA tests/test_gpu_memory.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import time
import weakref
from pathlib import Path

import torch

import zipkv


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    tensor = torch.Tensor
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), tensor))


def one_prompt(model, method: str, ids, decode_steps: int):
    """Prefill + greedy steps with a fresh cache; (weak reference to the cache, its
    bytes_held, seconds)."""
    start = time.perf_counter()
    cache = zipkv.make_cache(method, model.config)
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, **zipkv.cache_kwargs(cache), use_cache=True)
    for _ in range(decode_steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, **zipkv.cache_kwargs(cache),
                    use_cache=True)
    held = cache.stats().bytes_held
    ref = weakref.ref(cache)
    del out, cache
    return ref, held, time.perf_counter() - start


def soak(model, method: str, grad: bool, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    rows = []
    with torch.set_grad_enabled(grad):
        for prompt in range(1, args.prompts + 1):
            ids = torch.randint(100, vocab, (1, args.tokens), generator=g).to(device)
            ref, held, seconds = one_prompt(model, method, ids, args.decode_steps)
            row = dict(prompt=prompt, cache_alive=ref() is not None, bytes_held=held, seconds=round(seconds, 3),
                       rss=rss_bytes(), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                       live_tensors=live_tensors())
            if device.type == "cuda":
                torch.cuda.synchronize()
                row["allocated"] = torch.cuda.memory_allocated()
            rows.append(row)
            print(json.dumps(dict(method=method, grad=grad, **row)), flush=True)
    warm, last = rows[min(args.warm, len(rows)) - 1], rows[-1]
    growth = {key: last[key] - warm[key] for key in ("rss", "peak_rss", "live_tensors", "allocated") if key in last}
    return dict(grad=grad, rows=rows, growth_from_warm=growth, caches_alive=sum(r["cache_alive"] for r in rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["zipkv"])
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--warm", type=int, default=10, help="growth is measured from this prompt to the last")
    p.add_argument("--modes", nargs="+", default=["grad", "no_grad"], choices=["grad", "no_grad"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/soak"))
    args = p.parse_args()
    unknown = [m for m in args.methods if m not in zipkv.METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {sorted(zipkv.METHODS)}")
    model, _ = zipkv.load_default_model(device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        runs = [soak(model, method, mode == "grad", args) for mode in args.modes]
        record = dict(method=method, model="SmolLM2-135M-Instruct (embedded)", prompts=args.prompts,
                      tokens=args.tokens, decode_steps=args.decode_steps, warm=args.warm, device=args.device,
                      torch=torch.__version__, host=platform.node(), threads=torch.get_num_threads(), runs=runs)
        path = args.out / f"{method}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        for run in runs:
            print(f"{method} grad={run['grad']}: caches alive {run['caches_alive']}, growth prompt {args.warm} -> "
                  f"{args.prompts}: {run['growth_from_warm']}  ({path})", flush=True)


if __name__ == "__main__":
    main()
