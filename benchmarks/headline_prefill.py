"""Prefill stage of the headline benchmark: the whole model's SDPA prefill (batch 1) with
DynamicCache and with each zipkv method's cache, in seconds and as a ratio to DynamicCache.
`NAME@N` (e.g. zipkv@4K): the same cache filled by zipkv.chunked_prefill in forwards of N
tokens, whose peak memory is the point.

Each (method, length): one untimed prefill (Triton compilation, autotuning), then `reps`
timed prefills, each into a fresh cache (median reported); only the last position's logits
are computed (logits_to_keep=1), as generate() does.
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch

from benchmarks import e2e_decode as e2e
from benchmarks.registry_decode import method_params

PREFILL_METHODS = ("dynamic", "zipkv", "zipcache", "kivi", "uniform", "snapkv", "h2o", "zipvl")


def split_chunk(text: str) -> tuple[str, int | None]:
    """"zipkv@4K" -> ("zipkv", 4096); "zipkv" -> ("zipkv", None)."""
    name, _, chunk = text.partition("@")
    if not chunk:
        return name, None
    size = chunk.upper()
    value = int(size[:-1]) * 1024 if size.endswith("K") and size[:-1].isdigit() else int(size) if size.isdigit() else 0
    if value < 1:
        raise ValueError(f"{text!r}: the chunk after @ must be a token count >= 1 such as 4096 or 4K")
    return name, value


def new_prefill_cache(method: str, model):
    import zipkv

    if method == "dynamic":
        return e2e.new_cache("dynamic", model)
    spec = zipkv.METHODS[method]
    return spec.build(model.config, **method_params(spec))


def time_prefill(method: str, model, length: int, device, reps: int, timer) -> dict:
    import zipkv

    rec = {"method": method, "batch": 1, "context": length}
    method, chunk = split_chunk(method)
    if chunk is not None:
        rec["chunk"] = chunk
    gen = torch.Generator(device=device).manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=device, generator=gen)
    times = []
    try:
        if method != "dynamic":
            rec["params"] = method_params(zipkv.METHODS[method])
        for i in range(reps + 1):  # the first run compiles / autotunes: untimed
            cache = new_prefill_cache(method, model)
            e2e.free_memory(device)
            e2e.reset_peak(device)
            base = e2e.mem_allocated(device)
            t0 = timer.start()
            if chunk is not None:
                zipkv.chunked_prefill(model, cache, ids, None, chunk)
            else:
                with torch.inference_mode():
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **zipkv.cache_kwargs(cache))
                    del out
            ms = timer.stop(t0)
            if i:
                times.append(ms / 1e3)
                rec["peak_over_weights_gib"] = (e2e.peak(device) - base) / e2e.GiB
                rec["bytes_held"] = e2e.cache_bytes("dynamic", cache) if method == "dynamic" else cache.stats().bytes_held
            del cache
        rec.update(seconds=statistics.median(times), seconds_runs=times)
    except Exception as error:
        rec["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        rec["traceback"] = traceback.format_exc(limit=6)[-2000:]
    finally:
        e2e.free_memory(device)
    return rec


def run_prefill(methods, lengths, model, device, reps: int, timer, deadline: float, log) -> dict:
    rows = []
    for length in lengths:
        for method in methods:
            if time.perf_counter() > deadline:
                rows.append({"method": method, "batch": 1, "context": length, "error": "skipped: deadline"})
                continue
            rec = time_prefill(method, model, length, device, reps, timer)
            rows.append(rec)
            log(f"prefill {method} 1 x {length}: {rec.get('seconds', rec.get('error'))}")
    for rec in rows:  # the ratio to the plain prefill of the same length
        plain = next((r for r in rows if r["method"] == "dynamic" and r["context"] == rec["context"]
                      and "seconds" in r), None)
        if plain and "seconds" in rec:
            rec["ratio_to_dynamic"] = rec["seconds"] / plain["seconds"]
    return {"reps": reps, "rows": rows}
