"""End-to-end decode benchmark (issue 6): a whole model's decode step over a filled cache.

Random weights at real shapes (Llama-3-8B by default, bf16): speed and memory do not depend
on trained weights. For each cache and each batch x context the cache is filled with random
K/V of `context` tokens (layer by layer, directly through the cache layers' update, no
prefill forward), then decode steps (one model forward of one token per sequence, greedy
next token) are timed with CUDA events after warm-up; the median is reported.

    python -m benchmarks.e2e_decode --out $OUT --tag e2e_h100            # GPU, full shapes
    python -m benchmarks.e2e_decode --device cpu                          # CPU: tiny model, about a minute
    python -m benchmarks.e2e_decode --plot benchmarks/results/e2e_graph_v9.json
(`zipkv bench-e2e` from a checkout takes the same options, zipkv/bench_cli.py.)

Caches (--caches):
  dynamic      transformers DynamicCache (bf16)
  quanto2      transformers QuantizedCache, optimum-quanto backend, 2-bit (HF defaults:
               group 64, fp16 residual 128)
  zip_packed   zipkv make_cache("zipcache", decode_path="packed"): decode reads the packed tiers
  zip_dequant  zipkv make_cache("zipcache", decode_path="dequantize"): dequantized copy + SDPA
  kivi         zipkv make_cache("kivi") (decode_path auto: packed on CUDA with Triton)
  zip_graph    zip_packed moved to static buffers (ZipCache.to_static), each step a CUDA-graph
               replay (zipkv.StaticDecoder); blocks are quantized between replays
  kivi_graph   kivi, likewise
  zipkv_graph  the zipkv preset (4-bit keys, 2-bit values, every token), likewise
  static_graph transformers StaticCache (bf16), each step a CUDA-graph replay: the fp16 cache
               without the eager host overhead. Its slack slots past the context (< 1%) are
               attended unmasked: the bytes read per step are those of a masked step, and
               random weights make no meaningful tokens anyway.

Graph caches are timed per run of K steps (K = the cache's stream_interval, so each run
includes one block quantization; 32 for StaticCache): ms/step = run time / K, median over runs.

Per case: ms/step (median), tokens/s = batch / step, peak memory during decode and during the
fill, bytes the cache holds (zipkv: cache.stats().bytes_held; HF caches: every tensor their
layers hold), the ratios vs DynamicCache of the same run, and the roofline: weights read per
step (all parameters but the input embedding) + cache bytes, over the device-to-device copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types

import torch

import zipkv
from zipkv.bench_cli import E2E_CACHES as CACHES
from zipkv.bench_cli import E2E_SHAPES, E2E_TIMING, add_e2e_arguments
ZIPKV = ("zip_packed", "zip_dequant", "kivi", "zip_graph", "kivi_graph", "zipkv_graph")
GRAPH = ("zip_graph", "kivi_graph", "zipkv_graph", "static_graph")
GiB = 2**30
FILL_CHUNK_BYTES = 256 << 20  # --fill-chunk-mb

# Llama-3-8B (Meta-Llama-3-8B config.json), random weights
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)
TINY = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, vocab_size=1000, max_position_embeddings=4096,
    tie_word_embeddings=False,
)


# -- device helpers --------------------------------------------------------------------------
def device_info(device):
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import optimum.quanto as oq

        info["optimum_quanto"] = getattr(oq, "__version__", "?")
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / GiB, 2))
    return info


class Timer:
    """Milliseconds of a region: CUDA events on the GPU, the host clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, start) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return (time.perf_counter() - start) * 1e3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mem_allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def copy_bandwidth(device, nbytes=1 << 30, reps=20) -> dict:
    """Device-to-device copy, bytes read + written (the roofline's bandwidth)."""
    if device.type != "cuda":
        return {"gbps": float("nan"), "note": "no GPU"}
    from benchmarks.timing import copy_ceiling

    return copy_ceiling(nbytes, reps)


# -- model ---------------------------------------------------------------------------------
def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape)
    config._attn_implementation = "sdpa"
    dtype = getattr(torch, args.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    # Explicit values: whatever init ran (or was skipped), no uninitialized memory (NaN/inf).
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model, config


def weight_bytes_read(model) -> int:
    """Bytes of the parameters one decode step reads: all but the input embedding table
    (only batch rows of it are gathered)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def kv_shape(config):
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, hd


# -- caches --------------------------------------------------------------------------------
_PY_UNPACK_NOTE = None


def _quanto_python_unpack():
    """optimum-quanto compiles a CUDA extension (unpack + AWQ + Marlin kernels) with nvcc on
    first use, which takes minutes. Its 2-bit KV path only needs `unpack`: give the extension
    the library's own PyTorch implementation instead, so nothing is compiled."""
    global _PY_UNPACK_NOTE
    if _PY_UNPACK_NOTE is not None:
        return _PY_UNPACK_NOTE
    try:
        from optimum.quanto.library.extensions.extension import _extensions
    except ImportError:
        _PY_UNPACK_NOTE = "no quanto extensions module"
        return _PY_UNPACK_NOTE

    def unpack(packed, bits):
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
        return torch.cat(parts).to(torch.uint8)

    ext = _extensions.get("quanto_cuda")
    if ext is not None and ext._lib is None:
        ext._lib = types.SimpleNamespace(unpack=unpack)
        _PY_UNPACK_NOTE = "quanto unpack: PyTorch ops (CUDA extension not compiled)"
    else:
        _PY_UNPACK_NOTE = "quanto unpack: library default"
    return _PY_UNPACK_NOTE


def new_cache(kind: str, model, max_len: int = 0):
    from transformers import DynamicCache, QuantizedCache, StaticCache

    if kind in ("dynamic", "quanto2", "static_graph"):
        model.config._attn_implementation = "sdpa"  # a zipkv cache switched it to "zipkv"
    if kind == "dynamic":
        try:
            return DynamicCache(config=model.config)
        except TypeError:
            return DynamicCache()
    if kind == "quanto2":
        _quanto_python_unpack()
        return QuantizedCache("quanto", model.config, nbits=2)
    if kind == "static_graph":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if kind in ("zip_packed", "zip_graph"):
        return zipkv.make_cache("zipcache", model.config, decode_path="packed")
    if kind == "zip_dequant":
        return zipkv.make_cache("zipcache", model.config, decode_path="dequantize")
    if kind in ("kivi", "kivi_graph"):
        return zipkv.make_cache("kivi", model.config)
    if kind == "zipkv_graph":
        return zipkv.make_cache("zipkv", model.config, decode_path="packed")
    raise ValueError(f"cache must be one of {CACHES} (got {kind!r})")


def _tensor_bytes(obj, seen) -> int:
    """Bytes of the tensors in obj, each once; tensor subclasses (optimum-quanto's packed
    tensors) are counted through the inner tensors they flatten into."""
    if obj is None or id(obj) in seen or not isinstance(obj, torch.Tensor):
        return 0
    seen.add(id(obj))
    flatten = getattr(obj, "__tensor_flatten__", None)
    if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
        return sum(_tensor_bytes(getattr(obj, name), seen) for name in flatten()[0])
    return obj.numel() * obj.element_size()


def cache_bytes(kind: str, cache) -> int:
    if kind in ZIPKV:
        return cache.stats().bytes_held
    seen: set[int] = set()  # transformers' layers keep .keys/.values (+ the quantized states)
    attrs = ("keys", "values", "_quantized_keys", "_quantized_values")
    return sum(_tensor_bytes(getattr(layer, a, None), seen) for layer in cache.layers for a in attrs)


def fill_chunk(batch: int, context: int, kv_heads: int, head_dim: int, target_bytes=256 << 20) -> int:
    """Tokens per fill chunk for zipkv caches: about 256 MB of fp16 K+V at a time, so the
    quantization temporaries stay small next to the cache (large batches fit as they would
    when decoding)."""
    per_token = batch * kv_heads * head_dim * 2 * 2
    return max(256, min(context, target_bytes // per_token))


def fill(kind: str, cache, model, batch: int, context: int, device, dtype, seed=0) -> None:
    """Put `context` tokens of random K/V into every layer of the cache.

    HF caches: one cache.update per layer (QuantizedCache quantizes all of it at once, as after
    a prefill). zipkv caches: each layer's update in chunks, each followed by what zipkv's
    attention function does after attention (observe a query: score, then quantize what is
    due), with one random query per sequence. No attention runs during the fill, so the
    update is told not to build the dequantized copy it would otherwise return for a
    multi-token forward.
    """
    n_layers, n_q, n_kv, hd = kv_shape(model.config)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(b, h, n):
        return torch.randn(b, h, n, hd, device=device, dtype=dtype, generator=gen)

    if kind not in ZIPKV:
        positions = {"cache_position": torch.arange(context, device=device)}  # StaticCache (older transformers)
        for i in range(n_layers):
            k, v = rand(batch, n_kv, context), rand(batch, n_kv, context)
            cache.update(k, v, i, positions)
            del k, v
        return
    from zipkv.attention import _take_waiting_layer as take_note

    chunk = fill_chunk(batch, context, n_kv, hd, FILL_CHUNK_BYTES)
    scaling = hd**-0.5
    for layer in cache.layers:
        layer._use_packed_path = lambda new_tokens: True  # instance override, removed below
        try:
            for start in range(0, context, chunk):
                n = min(chunk, context - start)
                k, v = rand(batch, n_kv, n), rand(batch, n_kv, n)
                layer.update(k, v)
                take_note(layer.layer_idx)  # what zipkv's attention function does first
                del k, v
                if layer.settings.needs_queries:
                    layer.observe(rand(batch, n_q, 1), None, scaling)
                else:
                    layer.awaiting_queries = False
                    layer.compress_due()
        finally:
            del layer._use_packed_path
    if cache.get_seq_length() != context:
        raise RuntimeError(f"fill: cache holds {cache.get_seq_length()} tokens, expected {context}")


# -- decode ----------------------------------------------------------------------------------
def decode_steps(model, cache, batch, device, warmup, reps, cap_s, timer):
    """Times `reps` decode steps after `warmup` (each: forward of one token per sequence and
    the greedy next token). Stops early (>= 3 timed steps) once cap_s seconds are spent."""
    vocab = model.config.vocab_size
    tok = torch.randint(0, vocab, (batch, 1), device=device)
    times = []
    t_begin = time.perf_counter()
    for step in range(warmup + reps):
        t0 = timer.start()
        out = model(input_ids=tok, **zipkv.cache_kwargs(cache), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        del out
        ms = timer.stop(t0)
        if step >= warmup:
            times.append(ms)
            if len(times) >= 3 and time.perf_counter() - t_begin > cap_s:
                break
    return times


GRAPH_WARMUP = 3  # the first step compiles and captures


def graph_run_length(kind: str, cache) -> int:
    return cache.settings.stream_interval if kind in ZIPKV else 32


def graph_stepper(kind, model, cache, batch, context, device, steps: int):
    """A step function replaying one captured decode step (zipkv: StaticDecoder; StaticCache:
    the same capture recipe here)."""
    vocab = model.config.vocab_size
    tok = torch.randint(0, vocab, (batch, 1), device=device)
    positions = torch.full((batch,), context, device=device, dtype=torch.long)
    if kind in ZIPKV:
        from zipkv.graph_decode import StaticDecoder

        return StaticDecoder(model, cache, tok, positions, steps).step
    ids, pos = tok.clone(), positions[:, None].clone()
    cpos = torch.tensor([context], device=device)

    def forward():
        out = model(input_ids=ids, position_ids=pos, cache_position=cpos, **zipkv.cache_kwargs(cache), use_cache=True)
        ids.copy_(out.logits[:, -1:].argmax(-1))
        pos.add_(1)
        cpos.add_(1)

    if device.type != "cuda":  # CPU smoke test: the same step, eagerly
        return forward
    from zipkv.graph_decode import capture

    return capture(forward).replay


def graph_steps_needed(run_length, runs) -> int:
    """Steps a graph case takes: warm-up, `runs` runs of `run_length`, a margin."""
    return GRAPH_WARMUP + runs * run_length + 8


def graph_decode_steps(kind, model, cache, batch, context, device, runs, timer, profile=False):
    """(ms/step of each run of K replays (K: graph_run_length), extra facts)."""
    k = graph_run_length(kind, cache)
    step = graph_stepper(kind, model, cache, batch, context, device, graph_steps_needed(k, runs + profile))
    for _ in range(GRAPH_WARMUP):
        step()
    times = []
    for _ in range(runs):
        t0 = timer.start()
        for _ in range(k):
            step()
        times.append(timer.stop(t0) / k)
    extra = {}
    decoder = getattr(step, "__self__", None)  # StaticDecoder.step (StaticCache: CUDAGraph.replay)
    if hasattr(decoder, "flushes"):
        extra = {"flushes": decoder.flushes, "flush_host_ms_mean": 1e3 * decoder.flush_seconds / max(1, decoder.flushes)}
    if profile and device.type == "cuda":
        extra["profile"] = profile_calls(step, k, device)
    return times, extra


def profile_calls(step, k, device, top=15) -> dict:
    """torch.profiler over one run of k graph steps: GPU busy time per step, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(k):
            step()
        sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / k
    return _kernel_table(prof, k, wall_ms, top)


def profile_steps(model, cache, batch, device, steps=2, top=15) -> dict:
    """torch.profiler over a few decode steps: GPU busy time per step and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    vocab = model.config.vocab_size
    tok = torch.randint(0, vocab, (batch, 1), device=device)
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            out = model(input_ids=tok, **zipkv.cache_kwargs(cache), use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            del out
        sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    return _kernel_table(prof, steps, wall_ms, top)


def _kernel_table(prof, steps, wall_ms, top) -> dict:
    def dev_self(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    # kernels only (an aten op's row repeats the time of the kernels it launched)
    events = [e for e in prof.key_averages() if dev_self(e) > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy_us = sum(dev_self(e) for e in events)
    events.sort(key=dev_self, reverse=True)
    rows = [{"name": e.key[:90], "calls_per_step": e.count / steps, "ms_per_step": dev_self(e) / 1e3 / steps}
            for e in events[:top]]
    return {"steps": steps, "wall_ms_per_step_profiled": wall_ms, "gpu_busy_ms_per_step": busy_us / 1e3 / steps,
            "top_kernels": rows}


def run_case(args, model, kind, batch, context, device, dtype, timer, ceiling_gbps, w_bytes, profile=False):
    rec = {"cache": kind, "batch": batch, "context": context}
    cache = None
    try:
        free_memory(device)
        base = mem_allocated(device)
        reset_peak(device)
        t0 = time.perf_counter()
        runs = args.graph_runs
        cache = new_cache(kind, model, -(-(context + graph_steps_needed(32, runs + 1)) // 256) * 256)
        with torch.inference_mode():
            fill(kind, cache, model, batch, context, device, dtype)
            sync(device)
            rec["fill_s"] = time.perf_counter() - t0
            rec["peak_fill_gib"] = peak(device) / GiB
            rec["resident_after_fill_gib"] = mem_allocated(device) / GiB
            rec["cache_bytes"] = cache_bytes(kind, cache)
            rec["cache_gib"] = rec["cache_bytes"] / GiB
            rec["allocated_by_cache_gib"] = (mem_allocated(device) - base) / GiB
            reset_peak(device)
            warm = args.warmup_slow if kind in ("quanto2", "zip_dequant") else args.warmup
            if kind in GRAPH:
                warm = GRAPH_WARMUP
                times, extra = graph_decode_steps(kind, model, cache, batch, context, device, runs, timer, profile)
                rec.update(extra, steps_per_run=graph_run_length(kind, cache))
            else:
                times = decode_steps(model, cache, batch, device, warm, args.reps, args.case_cap_s, timer)
            rec["peak_decode_gib"] = peak(device) / GiB
            rec["step_ms"] = times
            rec["ms_per_step"] = statistics.median(times)
            rec["tokens_per_s"] = batch / (rec["ms_per_step"] / 1e3)
            rec["steps_timed"], rec["warmup_steps"] = len(times), warm
            if kind in ZIPKV:
                # True when the last decode step attended over the packed tiers (decode_attention)
                rec["attended_packed"] = bool(cache.layers[0].returned_fp16_only)
                rec["static"] = cache.is_static
                if cache.is_static:  # the buffers, with room for the steps timed: what the device holds
                    rec["static_bytes_held"] = cache.stats().bytes_held
                rec["stats"] = {k: v for k, v in cache.stats().to_dict().items() if not k.endswith("per_layer")}
            if ceiling_gbps == ceiling_gbps:  # not NaN
                rec["roofline_ms"] = (w_bytes + rec["cache_bytes"]) / (ceiling_gbps * 1e9) * 1e3
                rec["x_roofline"] = rec["ms_per_step"] / rec["roofline_ms"]
            if profile and device.type == "cuda" and kind not in GRAPH:
                rec["profile"] = profile_steps(model, cache, batch, device)
    except Exception as error:  # one failing case must not end the run
        rec["error"] = repr(error)[:400]
        rec["oom"] = is_oom(error)
        rec["traceback"] = traceback.format_exc()[-3000:]
        error = None
    finally:
        cache = None
        free_memory(device)
    return rec


def try_batch(args, model, kind, batch, context, device, dtype, timer) -> dict:
    """Does fill + a few decode steps fit at this batch? (OOM = no)."""
    rec = {"cache": kind, "batch": batch, "context": context}
    cache = None
    try:
        free_memory(device)
        reset_peak(device)
        cache = new_cache(kind, model)
        with torch.inference_mode():
            fill(kind, cache, model, batch, context, device, dtype)
            times = decode_steps(model, cache, batch, device, 2, 3, 10.0, timer)
        rec.update(fits=True, peak_gib=peak(device) / GiB, ms_per_step=statistics.median(times),
                   tokens_per_s=batch / (statistics.median(times) / 1e3), step_ms=times)
    except Exception as error:
        rec.update(fits=False, oom=is_oom(error), error=repr(error)[:300])
        error = None
    finally:
        cache = None
        free_memory(device)
    return rec


def predict_max_batch(cases, kind, context, capacity) -> int | None:
    """From the two measured batches at this context: peak memory = a + b * batch."""
    rows = sorted((c for c in cases if c["cache"] == kind and c["context"] == context and "ms_per_step" in c),
                  key=lambda c: c["batch"])
    if len(rows) < 2:
        return None
    lo, hi = rows[0], rows[-1]
    pk = lambda c: max(c["peak_decode_gib"], c["peak_fill_gib"]) * GiB  # noqa: E731
    per_seq = (pk(hi) - pk(lo)) / (hi["batch"] - lo["batch"])
    fixed = pk(lo) - per_seq * lo["batch"]
    return max(1, int((capacity - fixed) // per_seq)) if per_seq > 0 else None


def max_batch_search(args, model, kind, context, guess, device, dtype, timer, deadline) -> dict:
    out = {"cache": kind, "context": context, "predicted": guess, "tries": []}
    b, ok, bad = guess, None, None
    while len(out["tries"]) < args.max_tries and time.perf_counter() < deadline:
        rec = try_batch(args, model, kind, b, context, device, dtype, timer)
        out["tries"].append(rec)
        print(f"  max-batch {kind} B={b}: {'fits' if rec['fits'] else 'no: ' + rec.get('error', '')[:80]}", flush=True)
        if rec["fits"]:
            ok = b if ok is None else max(ok, b)
        else:
            bad = b if bad is None else min(bad, b)
        if ok is not None and bad is not None and bad == ok + 1:
            break
        if bad is None:
            b = ok + 1  # still fitting: one more
        elif ok is None:
            b = bad - max(1, bad // 10)  # the prediction was too high: step down ~10%
        else:
            b = (ok + bad) // 2
        if b < 1:
            break
    out["largest_fitting"] = ok
    out["smallest_failing"] = bad
    return out


# -- report ----------------------------------------------------------------------------------
def table(res) -> str:
    cases = [c for c in res["cases"]]
    dyn = {(c["batch"], c["context"]): c for c in cases if c["cache"] == "dynamic" and "ms_per_step" in c}
    lines = ["| cache | B x ctx | ms/step | tok/s | vs Dynamic tok/s | peak decode GiB | peak fill GiB | cache GiB | "
             "Dynamic/cache bytes | roofline ms | x roofline |", "|" + "---|" * 11]
    for c in cases:
        shape = f"{c['batch']} x {c['context']}"
        if "ms_per_step" not in c:
            lines.append(f"| {c['cache']} | {shape} | error: {c.get('error', '')[:60]} |")
            continue
        d = dyn.get((c["batch"], c["context"]))
        speed = f"{c['tokens_per_s'] / d['tokens_per_s']:.2f}x" if d else "-"
        ratio = f"{d['cache_bytes'] / c['cache_bytes']:.2f}x" if d and c["cache_bytes"] else "-"
        roof = c.get("roofline_ms", float("nan"))
        lines.append(
            f"| {c['cache']} | {shape} | {c['ms_per_step']:.1f} | {c['tokens_per_s']:.1f} | {speed} | "
            f"{c['peak_decode_gib']:.1f} | {c['peak_fill_gib']:.1f} | {c['cache_gib']:.2f} | {ratio} | "
            f"{roof:.1f} | {c.get('x_roofline', float('nan')):.1f} |")
    for m in res.get("max_batch", []):
        best = max((t for t in m["tries"] if t["fits"]), key=lambda t: t["batch"], default=None)
        extra = f", {best['ms_per_step']:.0f} ms/step = {best['tokens_per_s']:.0f} tok/s there" if best else ""
        lines.append(f"max batch at {m['context']}: {m['cache']} fits {m['largest_fitting']} "
                     f"(fails at {m['smallest_failing']}, predicted {m['predicted']}){extra}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the run's own shapes (not the floor-context rows); older JSONs: contexts >= 1024
    run_shapes = {tuple(s) for s in res.get("shapes", [])}
    cases = [c for c in res["cases"] if "ms_per_step" in c
             and ((c["batch"], c["context"]) in run_shapes if run_shapes else c["context"] >= 1024)]
    shapes = sorted({(c["batch"], c["context"]) for c in cases})
    kinds = [k for k in CACHES if any(c["cache"] == k for c in cases)]
    gpu = res.get("device", {}).get("gpu")  # a CPU run measures no memory: its panel shows cache bytes
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [3, 3, 1.4]})
    width = 0.8 / max(1, len(kinds))
    for i, k in enumerate(kinds):
        xs, tps, roof, mem = [], [], [], []
        for j, s in enumerate(shapes):
            c = next((c for c in cases if c["cache"] == k and (c["batch"], c["context"]) == s), None)
            if c is None:
                continue
            xs.append(j + i * width)
            tps.append(c["tokens_per_s"])
            roof.append(c["batch"] / (c["roofline_ms"] / 1e3) if c.get("roofline_ms") else float("nan"))
            mem.append(c["peak_decode_gib"] if gpu else c["cache_bytes"] / 2**20)
        bars = axes[0].bar(xs, tps, width, label=k)
        axes[0].scatter(xs, roof, marker="_", s=200, color=bars.patches[0].get_facecolor() if bars.patches else "k")
        axes[1].bar(xs, mem, width, label=k)
    ticks = [j + width * (len(kinds) - 1) / 2 for j in range(len(shapes))]
    fits = []
    for m in res.get("max_batch", []):
        best = max((t for t in m["tries"] if t["fits"]), key=lambda t: t["batch"], default=None)
        if best:
            fits.append((m["cache"], best))
    if fits:
        bars = axes[2].bar([f for f, _ in fits], [b["tokens_per_s"] for _, b in fits], color="gray")
        for bar, (_, b) in zip(bars, fits):
            axes[2].annotate(f"B={b['batch']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                             va="bottom", fontsize=9)
        ctx = res["max_batch"][0]["context"]
        axes[2].set_title(f"tok/s at the largest batch tried that fits,\n{ctx // 1024}K context", fontsize=10)
    else:
        axes[2].set_visible(False)  # no largest-batch search in this run
    memory_title = "peak memory during decode (GiB)" if gpu else "bytes the cache holds (MiB)"
    for ax, title in zip(axes[:2], ("decode tokens/s (bars) and roofline (dashes)", memory_title)):
        ax.set_xticks(ticks, [f"{b} x {n // 1024}K" if n >= 1024 else f"{b} x {n}" for b, n in shapes])
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    dev = res.get("device", {})
    model = res.get("model", "Llama-3-8B shapes")
    fig.suptitle(f"e2e decode, {model} ({res.get('layers')} layers, random {res.get('dtype', 'bfloat16')}), "
                 f"{dev.get('gpu', dev.get('device'))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main ------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_e2e_arguments(ap)
    return ap.parse_args(argv)


def main(argv=None, args=None) -> dict:
    args = parse_args(argv) if args is None else args
    if args.plot:
        png = os.path.splitext(args.plot)[0] + ".png"
        with open(args.plot) as f:
            plot(json.load(f), png)
        print("wrote", png)
        return {}
    global FILL_CHUNK_BYTES
    FILL_CHUNK_BYTES = int(args.fill_chunk_mb * 2**20)
    t_start = time.perf_counter()
    deadline = t_start + args.deadline_s if args.deadline_s else float("inf")
    resolve_defaults(args)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.json")
    command = os.environ.get("ZIPKV_BENCH_COMMAND") or " ".join(  # set by `zipkv bench-e2e`
        ["python", "-m", "benchmarks.e2e_decode"] + (argv if argv is not None else sys.argv[1:]))
    res = {"command": command,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_info(device),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "cases": [], "max_batch": []}

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    t = time.perf_counter()
    model, config = build_model(args, device)
    sync(device)
    w_bytes = weight_bytes_read(model)
    res.update(model="tiny Llama" if args.tiny else "Llama-3-8B shapes", dtype=args.dtype)
    res.update(layers=config.num_hidden_layers, model_config={k: getattr(config, k, None) for k in (TINY if args.tiny else LLAMA3_8B)},
               weights_read_bytes=w_bytes, model_build_s=time.perf_counter() - t,
               model_resident_gib=mem_allocated(device) / GiB)
    res["copy_ceiling"] = copy_bandwidth(device)
    ceiling = res["copy_ceiling"]["gbps"]
    print(f"model: {config.num_hidden_layers} layers, {w_bytes / 1e9:.2f} GB read per step; "
          f"copy {ceiling:.0f} GB/s", flush=True)
    save()

    shapes = [tuple(map(int, s.lower().split("x"))) for s in args.shapes.split(",") if s]
    kinds = [k for k in args.caches.split(",") if k]
    for k in kinds:
        if k not in CACHES:
            raise ValueError(f"--caches: {k!r} is not one of {CACHES}")
    if "quanto2" in kinds and not quanto_installed():
        print("quanto not installed: skipped", flush=True)  # an optional baseline (pip install zipkv[quanto])
        kinds.remove("quanto2")
        res["skipped"] = {"quanto2": "optimum-quanto not installed"}
    res["shapes"] = [list(s) for s in shapes]
    timer = Timer(device)
    largest = max(shapes, key=lambda s: s[0] * s[1])
    profiled = set(p for p in args.profile.split(",") if p)
    jobs = [(k, b, n) for (b, n) in shapes for k in kinds]
    if args.floor_context:
        jobs += [("dynamic", b, args.floor_context) for b in sorted({b for b, _ in shapes})]
    for kind, b, n in jobs:
        if time.perf_counter() > deadline:
            res["cases"].append({"cache": kind, "batch": b, "context": n, "error": "skipped: deadline"})
            continue
        rec = run_case(args, model, kind, b, n, device, dtype, timer, ceiling, w_bytes,
                       profile=(("all" in profiled and n >= 1024) or (kind in profiled and (b, n) == largest)))
        res["cases"].append(rec)
        save()
        if "ms_per_step" in rec:
            print(f"{kind:12s} {b} x {n}: {rec['ms_per_step']:.2f} ms/step, {rec['tokens_per_s']:.1f} tok/s, "
                  f"peak {rec['peak_decode_gib']:.2f} GiB (fill {rec['peak_fill_gib']:.2f}), cache "
                  f"{rec['cache_gib']:.3f} GiB, fill {rec['fill_s']:.1f} s", flush=True)
        else:
            print(f"{kind:12s} {b} x {n}: ERROR {rec['error']}\n{rec.get('traceback', '')[-1500:]}", flush=True)

    if device.type == "cuda" and args.max_batch:
        context = args.max_batch_context or largest[1]
        free_memory(device)
        free, total = torch.cuda.mem_get_info(device)
        capacity = free + torch.cuda.memory_reserved(device)
        res["max_batch_capacity_gib"] = capacity / GiB
        for kind in [k for k in args.max_batch.split(",") if k]:
            guess = predict_max_batch(res["cases"], kind, context, capacity)
            if guess is None or time.perf_counter() > deadline:
                res["max_batch"].append({"cache": kind, "context": context, "predicted": guess, "tries": [],
                                         "largest_fitting": None, "smallest_failing": None,
                                         "note": "skipped (deadline or no prediction)"})
                continue
            res["max_batch"].append(max_batch_search(args, model, kind, context, guess, device, dtype, timer, deadline))
            save()
    res["total_s"] = time.perf_counter() - t_start
    save()
    print(table(res), flush=True)
    print("wrote", path, flush=True)
    write_plot(res, os.path.splitext(path)[0] + ".png")
    return res


def quanto_installed() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:  # no `optimum` at all
        return False


def resolve_defaults(args) -> None:
    """--device: CUDA when there is one; a CPU run takes the tiny model and small shapes."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cpu" and not args.tiny:
        print("cpu: the tiny model (Llama-3-8B shapes need a GPU)", flush=True)
        args.tiny = True
    kind = "cuda" if torch.device(args.device).type == "cuda" else "cpu"
    if args.shapes is None:
        args.shapes = E2E_SHAPES[kind]
    for name, value in E2E_TIMING[kind].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def write_plot(res: dict, png: str) -> None:
    """The PNG beside the JSON, where matplotlib is installed (zipkv[eval])."""
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib not installed: no PNG", flush=True)
        return
    plot(res, png)
    print("wrote", png, flush=True)


if __name__ == "__main__":
    main()
