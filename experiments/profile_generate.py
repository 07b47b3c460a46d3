"""Where generate()'s decode step goes with a static_for_generate cache (issue 19: generate()
took 1.46x StaticDecoder's compiled graph step at 8 x 4K, 32 layers). Per step, on the host:
the whole step (a logits processor's wall clock), zipkv's pre-hook (compiled.between_steps),
the compiled model call (transformers' `_compiled_call`: dynamo's guards, the CUDA-graph tree's
replay); on the GPU: the interval between steps (CUDA events) and, from one profiled call, the
device's busy time per step. What is neither hook nor model call is transformers' own work
(inputs, logits processors, stopping criteria; its stopping check reads a device value every
step, so that host work is not hidden behind the GPU's).

    python3 -m experiments.profile_generate --out OUT.json --layers 32 --batch 8 --context 4096 --new 48

A method named METHOD+nnguards runs generate() with a CompileConfig that skips dynamo's guards on
the model's modules (torch.compiler.skip_guard_on_all_nn_modules_unsafe; CUDA graphs as in
mode "reduce-overhead"); --graph also times StaticDecoder's compiled graph step of the first
method in the same run (benchmarks.compiled_check), the step generate() is compared with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.compiled_check import llama3_8b_shapes
from benchmarks.headline_rows import StepClock


class HostClock:
    """A logits processor marking the host time of each step."""

    def __init__(self):
        self.marks = []

    def __call__(self, input_ids, scores):
        self.marks.append(time.perf_counter())
        return scores


def timed(fn, sink):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sink.append((time.perf_counter() - t0) * 1e3)
        return out

    return wrapper


def median_ms(values, skip=4):
    values = values[skip:]
    return round(statistics.median(values), 4) if values else None


def main():
    import zipkv
    import zipkv.compiled as compiled
    from transformers import LogitsProcessorList

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--methods", default="zipkv,full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--graph", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = llama3_8b_shapes(device, args.layers)
    ids = torch.randint(3, 128000, (args.batch, args.context), device=device)
    mask = torch.ones_like(ids)
    hook_ms, call_ms = [], []
    compiled.between_steps = timed(compiled.between_steps, hook_ms)  # the pre-hook calls it by name
    report = {"layers": args.layers, "batch": args.batch, "context": args.context, "new": args.new,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "methods": {}}

    def compile_config(name):
        from transformers import CompileConfig

        if not name.endswith("+nnguards"):
            return {}
        return {"compile_config": CompileConfig(mode=None, options={
            "triton.cudagraphs": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})}

    def run(name, profile=False):
        method = name.split("+")[0]
        cache = zipkv.make_cache(method, model.config).static_for_generate(model, args.new)
        gpu, host = StepClock(device), HostClock()
        hook_ms.clear()
        call_ms.clear()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                           logits_processor=LogitsProcessorList([gpu, host]), **zipkv.cache_kwargs(cache),
                           **compile_config(name))
        cache.step_hook.remove()
        sync()
        return gpu.intervals_ms(), [(b - a) * 1e3 for a, b in zip(host.marks, host.marks[1:])]

    for method in args.methods.split(","):
        t0 = time.perf_counter()
        run(method)  # compiles and captures
        first_s = time.perf_counter() - t0
        if hasattr(model, "_compiled_call") and not getattr(model._compiled_call, "_zipkv_timed", False):
            model._compiled_call = timed(model._compiled_call, call_ms)
            model._compiled_call._zipkv_timed = True
        gpu_steps, host_steps = run(method)
        row = {"first_call_s": round(first_s, 1), "gpu_interval_ms": median_ms(gpu_steps),
               "host_step_ms": median_ms(host_steps), "hook_ms": median_ms(hook_ms, 5),
               "compiled_call_ms": median_ms(call_ms, 5), "compiled_call_calls": len(call_ms)}
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            run(method)
        busy = sum(e.self_device_time_total for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0)
        row["gpu_busy_ms_per_step_incl_prefill"] = round(busy / 1e3 / args.new, 4)
        top = sorted(((e.key, round(e.self_cpu_time_total / 1e3, 2), e.count) for e in prof.key_averages()),
                     key=lambda r: -r[1])[:25]
        row["top_cpu_self_ms"] = top
        if row["host_step_ms"] and row["hook_ms"] is not None and row["compiled_call_ms"] is not None:
            row["transformers_rest_ms"] = round(row["host_step_ms"] - row["hook_ms"] - row["compiled_call_ms"], 4)
        print(method, json.dumps({k: v for k, v in row.items() if k != "top_cpu_self_ms"}), flush=True)
        report["methods"][method] = row
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
        torch._dynamo.reset()
    if args.graph:
        from benchmarks.compiled_check import static_decoder_run

        method = args.methods.split(",")[0].split("+")[0]
        _, ms = static_decoder_run(model, method, {}, ids, mask, args.new, True)
        report["graph_compiled_ms"] = {method: round(ms, 4)}
        print("StaticDecoder compiled graph step", method, round(ms, 4), "ms", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
