"""The rows of the headline benchmark (benchmarks/headline.py): which caches, how each row's
cache is filled, and how its decode step is timed.

Rows:
  bf16, fp8, int4   registry methods `full`, `fp8`, `int4` on zipkv's static decoder
                    (make_cache -> fill -> StaticDecoder: to_static, CUDA-graph replays)
  zipkv presets     `zipkv`, `zipcache`, `kivi`, `uniform` and every registry method whose
                    family is "quantize" or whose name starts with `rotated` / `auto`, likewise
  dynamic_eager     transformers DynamicCache, eager steps (what model.generate runs)
  hf_static_graph   transformers StaticCache, each step one captured CUDA graph; the fastest of
                    several SDPA dispatches (HF_STATIC_VARIANTS), each one's figure kept
  hf_generate_static transformers' own generate(cache_implementation="static") path: on CUDA it
                    compiles the forward (torch.compile, mode reduce-overhead), timed per step
  quanto2           transformers QuantizedCache, optimum-quanto 2-bit (HF defaults), eager

A row's cache is filled with `context` tokens by the cheapest correct means: `kv` (default) puts
random K/V into every layer through the cache's own update path, the zipkv quantizing layers
compressing as they would after a prefill (benchmarks/e2e_decode.py fill: no model forward,
nothing but the cache and one chunk of temporaries); `prefill` runs the model over random token
ids in chunks of at most --prefill-tokens tokens (batch x chunk), the one way for a cache whose
layers the kv fill does not know. Random weights make any K/V as meaningful as any other: speed
and bytes depend on the shapes only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
import traceback
from unittest import mock

import torch

from benchmarks import e2e_decode as e2e
from benchmarks.registry_decode import method_params

BASELINE_METHODS = {"bf16": "full", "fp8": "fp8", "int4": "int4"}  # row -> registry method
PRESETS = ("zipkv", "zipcache", "kivi", "uniform")
# hf_generate_static last: its torch.compile takes about a minute per shape
HF_ROWS = ("hf_static_graph", "dynamic_eager", "quanto2", "hf_generate_static")
GRAPH_WARMUP = 3
# HF StaticCache + a captured graph, one per SDPA dispatch: (extra env, SDPA backends or None)
HF_STATIC_VARIANTS = {
    "graph": ({}, None),  # default dispatch: transformers packs the GQA heads, full-capacity bool mask
    "graph_efficient": ({}, "EFFICIENT_ATTENTION"),
    "graph_cudnn": ({}, "CUDNN_ATTENTION"),
    "graph_force_gqa": ({"TRANSFORMERS_SDPA_FORCE_GQA": "1"}, None),  # enable_gqa=True with the mask
}


def zipkv_method_rows(methods) -> list[str]:
    """The zipkv quantizing rows: the presets, then every other registry method of the
    quantize family or named rotated* / auto* (the baselines' methods excluded)."""
    rows = list(PRESETS)
    for name, spec in methods.items():
        if name in rows or name in BASELINE_METHODS.values():
            continue
        if spec.family == "quantize" or name.startswith(("rotated", "auto")):
            rows.append(name)
    return rows


def all_rows(methods) -> list[str]:
    """Every row, in the order a shape runs them (the headline comparisons first)."""
    return list(BASELINE_METHODS) + zipkv_method_rows(methods) + list(HF_ROWS)


def registry_method(row: str) -> str | None:
    """The registry method a row runs through StaticDecoder (None: a transformers cache row)."""
    if row in HF_ROWS:
        return None
    return BASELINE_METHODS.get(row, row)


def skip_reason(row: str, methods) -> str | None:
    """Why a row cannot run in this checkout (one line), or None."""
    if row in HF_ROWS:
        if row == "quanto2" and not e2e.quanto_installed():
            return "optimum-quanto not installed (pip install optimum-quanto)"
        return None
    name = registry_method(row)
    if name not in methods:
        return f"registry method {name!r} not in zipkv.METHODS in this checkout"
    if not methods[name].static:
        return f"registry method {name!r} has no static form yet (zipkv.METHODS[{name!r}].static is False)"
    return None


@dataclasses.dataclass
class Setting:
    """What every row of a run shares."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    timer: e2e.Timer
    warmup: int = GRAPH_WARMUP  # untimed steps (replays) before the timed runs
    runs: int = 5  # timed runs (graph rows) / steps (eager rows: runs x 2 steps)
    steps: int = 0  # steps per timed run; 0: a zipkv cache's stream_interval (one block quantized per run), else 32
    fill: str = "kv"  # "kv" or "prefill"
    prefill_tokens: int = 65536  # batch x chunk tokens per prefill forward
    cap_s: float = 12.0  # a row (an SDPA variant) stops timing after this long: >= 2 runs (eager: 3 steps)
    ceiling_gbps: float = float("nan")
    weight_bytes: int = 0
    profile: tuple = ()  # rows profiled on CUDA (kernels per step)
    hf_variants: tuple = tuple(HF_STATIC_VARIANTS)
    compile: bool = False  # zipkv's decoder rows (baselines included) with each decoder layer compiled (inductor)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def prefill_in_chunks(model, cache, batch: int, context: int, chunk_tokens: int, device, seed: int = 0) -> int:
    """Fill `cache` with `context` tokens of random ids through the model, batch x chunk <=
    chunk_tokens tokens per forward (only the last position's logits). Returns the chunk."""
    import zipkv

    chunk = max(1, min(context, chunk_tokens // batch))
    gen = torch.Generator(device=device).manual_seed(seed)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for start in range(0, context, chunk):
            n = min(chunk, context - start)
            ids = torch.randint(0, vocab, (batch, n), device=device, generator=gen)
            pos = torch.arange(start, start + n, device=device)[None].expand(batch, -1)
            out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **zipkv.cache_kwargs(cache))
            del out
    return chunk


def kv_fill_kind(cache) -> str | None:
    """How the kv fill (e2e_decode.fill) puts tokens into this cache: "layers" (one
    cache.update per layer with the whole context, as a prefill's forward does: transformers'
    caches and zipkv's bf16 / fp8 / int4 baselines, whose layers store what they get), "zipkv"
    (a lossy ZipCache: chunks, each compressed as after attention), or None (unknown layers:
    prefill through the model)."""
    from zipkv import ZipCache
    from zipkv.cache.base import ZipkvCache
    from zipkv.cache.baseline_cache import FullCache, TokenQuantCache

    if isinstance(cache, (FullCache, TokenQuantCache)) or not isinstance(cache, ZipkvCache):
        return "layers"
    if isinstance(cache, ZipCache) and not cache.settings.lossless:
        return "zipkv"
    return None


def fill_cache(cache, s: Setting, batch: int, context: int) -> str:
    """Fill the cache (see the module docstring); returns how."""
    kind = kv_fill_kind(cache) if s.fill == "kv" else None
    if kind is not None:
        with torch.inference_mode():  # e2e_decode.fill's kinds: a zipkv kind compresses, any other updates
            e2e.fill("zipkv_graph" if kind == "zipkv" else "dynamic", cache, s.model, batch, context, s.device, s.dtype)
        return f"kv ({kind})"
    chunk = prefill_in_chunks(s.model, cache, batch, context, s.prefill_tokens, s.device)
    return f"prefill, chunks of {chunk} tokens"


def filled(rec: dict, cache, s: Setting, batch: int, context: int) -> None:
    """fill_cache and its figures: how, seconds, peak memory, what is allocated after it."""
    t0 = time.perf_counter()
    rec["fill"] = fill_cache(cache, s, batch, context)
    e2e.sync(s.device)
    rec["fill_s"] = time.perf_counter() - t0
    rec["fill_peak_gib"] = e2e.peak(s.device) / e2e.GiB
    rec["allocated_after_fill_gib"] = e2e.mem_allocated(s.device) / e2e.GiB


def roofline(rec: dict, s: Setting) -> None:
    """roofline_ms = (weights read + the KV bytes of the tokens) / copy bandwidth."""
    if s.ceiling_gbps == s.ceiling_gbps:  # not NaN: a GPU run
        rec["roofline_ms"] = (s.weight_bytes + rec["kv_bytes"]) / (s.ceiling_gbps * 1e9) * 1e3
        rec["x_roofline"] = rec["ms_per_step"] / rec["roofline_ms"]


def timed_runs(step, runs: int, steps: int, timer, cap_s: float = float("inf")) -> list[float]:
    """ms/step of each of `runs` runs of `steps` calls of step(); fewer runs (>= 2) once cap_s
    seconds are spent."""
    times = []
    begin = time.perf_counter()
    for _ in range(runs):
        t0 = timer.start()
        for _ in range(steps):
            step()
        times.append(timer.stop(t0) / steps)
        if len(times) >= 2 and time.perf_counter() - begin > cap_s:
            break
    return times


def finish(rec: dict, times: list[float], batch: int, s: Setting) -> None:
    rec["ms_runs"] = times
    rec["ms_per_step"] = statistics.median(times)
    rec["tokens_per_s"] = batch / (rec["ms_per_step"] / 1e3)
    rec["peak_gib"] = e2e.peak(s.device) / e2e.GiB  # absolute: weights + cache + workspace
    roofline(rec, s)


def stream_interval(cache) -> int | None:
    settings = getattr(cache, "settings", None)
    return getattr(settings, "stream_interval", None)


# -- zipkv rows: make_cache -> fill -> StaticDecoder --------------------------------------------
def zipkv_row(rec: dict, name: str, s: Setting, batch: int, context: int) -> None:
    import zipkv
    from zipkv.graph_decode import StaticDecoder

    spec = zipkv.METHODS[name]
    params = method_params(spec)
    rec.update(method=name, params=params)
    cache = spec.build(s.model.config, **params)
    filled(rec, cache, s, batch, context)
    rec["kv_bytes"] = cache.stats().bytes_held  # the prompt's tokens as the cache holds them
    steps = s.steps or stream_interval(cache) or 32
    gen = torch.Generator(device=s.device).manual_seed(1)
    first = torch.randint(0, s.model.config.vocab_size, (batch, 1), device=s.device, generator=gen)
    positions = torch.full((batch,), context, device=s.device, dtype=torch.long)
    decoder = StaticDecoder(s.model, cache, first, positions, s.warmup + (s.runs + 1) * steps + 8, compile=s.compile)
    rec["bytes_held"] = cache.stats().bytes_held  # the static buffers, with room for the steps timed
    rec["allocated_before_decode_gib"] = e2e.mem_allocated(s.device) / e2e.GiB
    rec["setup_peak_gib"] = e2e.peak(s.device) / e2e.GiB  # fill and the move into static buffers
    e2e.reset_peak(s.device)
    t0 = time.perf_counter()
    decoder.step()  # the first step: kernels compiled (and the layers, with compile), the graph captured
    e2e.sync(s.device)
    rec.update(first_step_s=time.perf_counter() - t0, compiled=bool(s.compile))
    for _ in range(s.warmup - 1):
        decoder.step()
    times = timed_runs(decoder.step, s.runs, steps, s.timer, s.cap_s)
    finish(rec, times, batch, s)
    rec.update(steps_per_run=steps, flushes=decoder.flushes, cuda_graph=decoder.use_graph)
    if s.cuda and rec["row"] in s.profile:
        rec["profile"] = e2e.profile_calls(decoder.step, steps, s.device)


# -- transformers rows -------------------------------------------------------------------------
def eager_row(rec: dict, kind: str, s: Setting, batch: int, context: int) -> None:
    """DynamicCache / quanto: eager steps, each timed alone."""
    cache = e2e.new_cache(kind, s.model)
    filled(rec, cache, s, batch, context)
    rec["kv_bytes"] = rec["bytes_held"] = e2e.cache_bytes(kind, cache)
    e2e.reset_peak(s.device)
    with torch.inference_mode():
        times = e2e.decode_steps(s.model, cache, batch, s.device, s.warmup, 2 * s.runs, s.cap_s, s.timer)
    finish(rec, times, batch, s)
    if s.cuda and rec["row"] in s.profile:
        rec["profile"] = e2e.profile_steps(s.model, cache, batch, s.device)


@contextlib.contextmanager
def sdpa_dispatch(env: dict, backend: str | None):
    """SDPA restricted to one backend and / or transformers' SDPA env switches, for a capture."""
    with mock.patch.dict(os.environ, env):
        if backend is None:
            yield
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([getattr(SDPBackend, backend)]):
                yield


def hf_static_row(rec: dict, s: Setting, batch: int, context: int) -> None:
    """One StaticCache, filled once; each SDPA variant captures its own graph over it and runs
    on from where the previous one stopped. The row's figure is the fastest variant's. Runs of
    8 replays (every replay is the same step: no block quantization to include)."""
    steps = s.steps or 8
    per_variant = s.warmup + s.runs * steps + 2
    variants = [v for v in s.hf_variants if s.cuda or HF_STATIC_VARIANTS[v][1] is None]
    capacity = -(-(context + per_variant * len(variants) + 8) // 256) * 256
    cache = e2e.new_cache("static_graph", s.model, capacity)
    filled(rec, cache, s, batch, context)
    rec["bytes_held"] = e2e.cache_bytes("static_graph", cache)
    # every slot up to max_cache_len is attended (masked) each step: that is what it reads
    rec["kv_bytes"] = rec["bytes_held"]
    rec.update(max_cache_len=capacity, steps_per_run=steps, variants={})
    peaks = []
    for name in variants:
        env, backend = HF_STATIC_VARIANTS[name]
        out = rec["variants"][name] = {"sdpa_backend": backend or "default", "env": env}
        e2e.reset_peak(s.device)
        try:
            with torch.inference_mode(), sdpa_dispatch(env, backend):
                position = int(cache.get_seq_length())  # where the previous variant stopped
                step = e2e.graph_stepper("static_graph", s.model, cache, batch, position, s.device, per_variant)
                for _ in range(s.warmup):
                    step()
            with torch.inference_mode():
                times = timed_runs(step, s.runs, steps, s.timer, s.cap_s)
            out.update(ms_per_step=statistics.median(times), ms_runs=times)
            peaks.append(e2e.peak(s.device))
        except Exception as error:  # a backend that cannot run this shape: say so, try the next
            out["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        finally:
            step = None
            e2e.free_memory(s.device)
    ok = {n: v for n, v in rec["variants"].items() if "ms_per_step" in v}
    if not ok:
        raise RuntimeError(f"no StaticCache variant ran: {rec['variants']}")
    best = min(ok, key=lambda n: ok[n]["ms_per_step"])
    rec["best_variant"] = best
    finish(rec, ok[best]["ms_runs"], batch, s)
    rec["peak_gib"] = max(peaks) / e2e.GiB if s.cuda else 0.0
    if s.cuda and batch > 1:  # which SDPA kernels the default dispatch launches (eager steps, same cache)
        with torch.inference_mode():  # the cache was filled under it: an update outside it is refused
            rec["profile_default_dispatch"] = e2e.profile_steps(s.model, cache, batch, s.device)


class StepClock:
    """A logits processor that marks the time of every generate() step (CUDA events, no sync)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def __call__(self, input_ids, scores):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def forget_compiled(model) -> None:
    """Drop what generate()'s compilation keeps (the compiled forward on the model, dynamo's
    caches and CUDA-graph trees), which may hold the row's cache alive into the next rows."""
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    torch._dynamo.reset()


def hf_generate_row(rec: dict, s: Setting, batch: int, context: int) -> None:
    """transformers' generate() over a filled StaticCache: it runs the one uncached token as its
    prefill, then decode steps; on CUDA it compiles the forward (its auto-compile of static
    caches). ms/step: intervals between the steps' logits, after `warmup` steps (compilation,
    CUDA-graph recording), in runs of `steps` (8)."""
    from transformers import LogitsProcessorList

    import zipkv

    steps = s.steps or 8
    warmup = s.warmup + 3  # compile, cudagraph warm-up and recording happen in the first few steps
    new = warmup + s.runs * steps + 1
    capacity = -(-(context + new + 8) // 256) * 256
    cache = e2e.new_cache("static_graph", s.model, capacity)
    filled(rec, cache, s, batch, context)
    rec["kv_bytes"] = rec["bytes_held"] = e2e.cache_bytes("static_graph", cache)
    rec.update(max_cache_len=capacity, steps_per_run=steps, warmup_steps=warmup)
    gen = torch.Generator(device=s.device).manual_seed(2)
    ids = torch.randint(0, s.model.config.vocab_size, (batch, context + 1), device=s.device, generator=gen)
    clock = StepClock(s.device)
    e2e.reset_peak(s.device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = s.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, pad_token_id=0,
                                   logits_processor=LogitsProcessorList([clock]), **zipkv.cache_kwargs(cache))
        e2e.sync(s.device)
        rec["generate_s"] = time.perf_counter() - t0
        rec["new_tokens"] = int(out.shape[1] - ids.shape[1])
        del out
    finally:
        rec["compiled"] = hasattr(s.model, "_compiled_call")  # set by transformers when generate() compiled the forward
        forget_compiled(s.model)
    gaps = clock.intervals_ms()[warmup:]
    times = [statistics.fmean(gaps[i:i + steps]) for i in range(0, len(gaps) - steps + 1, steps)]
    if not times:
        raise RuntimeError(f"generate() ran {len(clock.marks)} steps, too few to time")
    finish(rec, times, batch, s)


def measure_row(row: str, s: Setting, batch: int, context: int) -> dict:
    """One row at one shape; the cache is freed before it returns. Failures are recorded."""
    rec = {"row": row, "batch": batch, "context": context}
    e2e.free_memory(s.device)
    base = e2e.mem_allocated(s.device)
    e2e.reset_peak(s.device)
    t0 = time.perf_counter()
    try:
        if row == "hf_static_graph":
            hf_static_row(rec, s, batch, context)
        elif row == "hf_generate_static":
            hf_generate_row(rec, s, batch, context)
        elif row == "dynamic_eager":
            eager_row(rec, "dynamic", s, batch, context)
        elif row == "quanto2":
            eager_row(rec, "quanto2", s, batch, context)
        else:
            zipkv_row(rec, registry_method(row), s, batch, context)
        before = rec.get("allocated_before_decode_gib", rec["allocated_after_fill_gib"])
        rec["workspace_gib"] = max(0.0, rec["peak_gib"] - before)  # what decoding allocates beyond the cache
    except Exception as error:  # one row's failure must not lose the others
        rec["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        rec["oom"] = e2e.is_oom(error)
        rec["traceback"] = traceback.format_exc(limit=8)[-2500:]
    finally:
        e2e.free_memory(s.device)
        rec["row_s"] = time.perf_counter() - t0
        rec["leaked_gib"] = (e2e.mem_allocated(s.device) - base) / e2e.GiB  # should be 0: the cache is gone
    return rec
