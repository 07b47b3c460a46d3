"""Every method of the registry through the static / CUDA-graph decode path, with its roofline.

For each method (default: every registry method whose static form exists, `zipkv.METHODS[m].static`)
the cache is filled by a real prefill forward of the model over random token ids (batch x
context, one forward, only the last position's logits), so each method's own policy picks,
quantizes or evicts what it holds; then `zipkv.StaticDecoder` replays captured decode steps
and runs of K steps are timed with CUDA events (median over runs). Per method: ms/step,
tokens/s, bytes held (`cache.stats().bytes_held`, checked against the allocator's growth),
prefill seconds, peak memory, and the roofline: weights read per step + bytes held, over the
device-to-device copy bandwidth measured in the same run; x_roofline = ms/step / roofline.

    python -m benchmarks.registry_decode --out $OUT                       # GPU: Llama-3-8B shapes, 8 x 32K
    python -m benchmarks.registry_decode --tiny --device cpu --out /tmp/r  # CPU smoke run, seconds
    python -m benchmarks.registry_decode --plot benchmarks/results/registry_decode_h200.json
    python -m benchmarks.registry_decode --merge OUT.json PART.json...      # later parts win per method
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import traceback
import types

import torch

from benchmarks.e2e_decode import (Timer, build_model, copy_bandwidth, device_info, free_memory, mem_allocated, peak,
                                   profile_calls, reset_peak, sync, weight_bytes_read)

# per-method settings for the benchmark (the registry's defaults otherwise): evicting methods
# keep a fifth of the prompt, as in the papers' headline settings
BENCH_PARAMS = {"evict": dict(ratio=0.2), "tiered": dict()}
# settings a method needs that its registry entry has no default for: mikv's ratio is the
# fraction held at fp16 (every other token 2-bit, none evicted), a fifth as for the evicting ones
METHOD_PARAMS = {"mikv": dict(ratio=0.2)}
GRAPH_WARMUP = 3


def method_params(spec) -> dict:
    """The benchmark's settings of one registry method, checked by `zipkv.registry.check_method` (a
    setting the method does not take, or lacks, fails here with the method named)."""
    from zipkv.registry import check_method

    params = dict(BENCH_PARAMS.get(spec.family, {}))
    params.update(METHOD_PARAMS.get(spec.name, {}))
    if not spec.takes_budget:
        params.pop("ratio", None)
    if "decode_path" in spec.params:
        params["decode_path"] = "packed"
    check_method(spec.name, params)
    return params


def run_method(name, model, batch, context, steps_per_run, runs, device, timer, ceiling_gbps, w_bytes,
               profile=False, compile=False) -> dict:
    import zipkv
    from zipkv.graph_decode import StaticDecoder

    spec = zipkv.METHODS[name]
    rec = dict(method=name, family=spec.family, batch=batch, context=context, compiled=bool(compile))
    free_memory(device)
    base = mem_allocated(device)
    reset_peak(device)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device, generator=gen)
    cache = None
    try:  # settings and build inside: a method that cannot be built is one row's error, not the run's end
        rec["params"] = params = method_params(spec)
        cache = spec.build(model.config, **params)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=ids, **zipkv.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1:].argmax(-1)
            del out
        sync(device)
        rec["prefill_s"] = time.perf_counter() - t0
        rec["prefill_peak_gib"] = (peak(device) - base) / 2**30
        positions = torch.full((batch,), context, device=device, dtype=torch.long)
        total = GRAPH_WARMUP + (runs + profile) * steps_per_run + 8
        decoder = StaticDecoder(model, cache, first, positions, total, compile=compile)
        free_memory(device)
        rec["bytes_held"] = cache.stats().bytes_held
        rec["allocated_over_base"] = mem_allocated(device) - base  # the cache + the decoder's buffers
        reset_peak(device)
        t0 = time.perf_counter()
        decoder.step()  # the first step: kernels compiled (and the layers, with compile), the graph captured
        sync(device)
        rec["first_step_s"] = time.perf_counter() - t0
        for _ in range(GRAPH_WARMUP - 1):
            decoder.step()
        times = []
        for _ in range(runs):
            t0 = timer.start()
            for _ in range(steps_per_run):
                decoder.step()
            times.append(timer.stop(t0) / steps_per_run)
        rec["ms_per_step"] = statistics.median(times)
        rec["ms_runs"] = times
        rec["tokens_per_s"] = batch / (rec["ms_per_step"] / 1e3)
        rec["decode_peak_gib"] = (peak(device) - base) / 2**30
        if profile and device.type == "cuda":  # kernels inside the replayed graph, per step
            rec["profile"] = profile_calls(decoder.step, steps_per_run, device)
        rec["flushes"] = decoder.flushes
        rec["cuda_graph"] = decoder.use_graph
        if ceiling_gbps == ceiling_gbps:  # not NaN (a GPU run)
            rec["roofline_ms"] = (w_bytes + rec["bytes_held"]) / (ceiling_gbps * 1e9) * 1e3
            rec["x_roofline"] = rec["ms_per_step"] / rec["roofline_ms"]
    except Exception as error:  # one method's failure must not lose the others' rows
        rec["error"] = f"{type(error).__name__}: {error}"
        rec["traceback"] = traceback.format_exc(limit=6)
    finally:
        del cache
        free_memory(device)
    return rec


def plot(path: str) -> str:
    """PNG beside the JSON: ms/step of each method's graph step against its roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        res = json.load(f)
    cases = [c for c in res["cases"] if "ms_per_step" in c]
    names = [c["method"] for c in cases]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(cases) + 2), 4.2))
    x = range(len(cases))
    ax.bar(x, [c["ms_per_step"] for c in cases], color=["#4477aa" if c["family"] == "quantize" else "#cc6677"
                                                       for c in cases], label="CUDA-graph step (median)")
    ax.scatter(x, [c.get("roofline_ms", float("nan")) for c in cases], color="black", marker="_", s=600, zorder=3,
               label="roofline: (weights + bytes held) / copy bandwidth")
    floor = res.get("model_floor_case")
    if floor and "ms_per_step" in floor:
        ax.axhline(floor["ms_per_step"], color="gray", ls="--", lw=1,
                   label=f"the same decoder at {floor['batch']} x {floor['context']} tokens (the step without its cache)")
    for i, c in enumerate(cases):
        ax.annotate(f"{c.get('x_roofline', float('nan')):.2f}x", (i, c["ms_per_step"]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("ms per decode step")
    first = cases[0] if cases else {}
    ax.set_title(f"every static method, {first.get('batch')} x {first.get('context')} tokens, "
                 f"{res['device'].get('gpu', res['device'].get('device'))}\n(blue: quantizing; red: evicting at 20% / tiered; label: x roofline)",
                 fontsize=10)
    ax.set_ylim(0, 1.3 * max(c["ms_per_step"] for c in cases))
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    return out


def merge(out_path: str, parts: list, draw: bool = True) -> str:
    """Merge part JSONs of this benchmark into one: the last part that measured a method wins;
    each case keeps the command, commit-free run facts and copy bandwidth of the run it came from,
    since its roofline was taken against that run's bandwidth."""
    cases, runs, first = {}, [], None
    for part in parts:
        with open(part) as f:
            res = json.load(f)
        first = first or res
        run = {k: res[k] for k in ("command", "device", "torch", "copy_bandwidth") if k in res}
        run["file"] = os.path.basename(part)
        runs.append(run)
        for case in res["cases"]:
            cases[case["method"]] = dict(case, run=len(runs) - 1)
    merged = dict(first, command="python -m benchmarks.registry_decode --merge " + " ".join([out_path] + parts),
                  runs=runs, cases=list(cases.values()))
    with open(out_path, "w") as f:
        json.dump(merged, f, indent=1)
    if draw:
        try:
            plot(out_path)
        except ImportError:
            print("matplotlib not installed: no PNG")
    return out_path


def main(argv=None) -> dict:
    import sys

    import zipkv

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--plot"]:
        print(plot(argv[1]))
        return {}
    if argv[:1] == ["--merge"]:
        print(merge(argv[1], argv[2:]))
        return {}

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="", help="comma-separated registry names (default: every method with a static form)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--runs", type=int, default=5, help="timed runs of --steps steps each (median reported)")
    p.add_argument("--steps", type=int, default=20, help="decode steps per timed run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model (CPU smoke run)")
    p.add_argument("--layers", type=int, default=0, help="override the layer count")
    p.add_argument("--out", required=True, help="folder for registry_decode.json")
    p.add_argument("--plot", help="draw the PNG of a result JSON and exit")
    p.add_argument("--profile", action="store_true", help="also profile one run of steps (top kernels per step)")
    p.add_argument("--tag", default="registry_decode")
    p.add_argument("--compile", action="store_true", help="each decoder layer compiled (StaticDecoder(compile=True))")
    args = p.parse_args(argv)
    names = [m for m in args.methods.split(",") if m] or [n for n, s in zipkv.METHODS.items() if s.static]
    unknown = sorted(set(names) - set(zipkv.METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {sorted(zipkv.METHODS)}")
    device = torch.device(args.device)
    if args.tiny and args.context == 32768:
        args.context, args.batch = 256, 2
    model, config = build_model(types.SimpleNamespace(tiny=args.tiny, layers=args.layers, dtype=args.dtype), device)
    timer = Timer(device)
    bandwidth = copy_bandwidth(device)
    w_bytes = weight_bytes_read(model)
    res = dict(command="python -m benchmarks.registry_decode " + " ".join(argv),
               device=device_info(device), host=platform.node(), torch=torch.__version__, copy_bandwidth=bandwidth,
               weight_bytes=w_bytes, model=config.to_dict() if args.tiny else "Llama-3-8B shapes, random weights",
               cases=[])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.json")
    for name in names:
        rec = run_method(name, model, args.batch, args.context, args.steps, args.runs, device, timer,
                         bandwidth.get("gbps", float("nan")), w_bytes, args.profile, args.compile)
        res["cases"].append(rec)
        line = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items() if k not in ("traceback", "ms_runs", "profile")}
        print(json.dumps(line), flush=True)
        with open(path, "w") as f:  # after every method: a killed run keeps what it measured
            json.dump(res, f, indent=1)
    try:
        plot(path)
    except ImportError:
        print("matplotlib not installed: no PNG")
    return res


if __name__ == "__main__":
    main()
