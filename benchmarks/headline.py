"""Headline decode benchmark (issue 19): zipkv against the baselines users pick, same run.

Llama-3-8B shapes with random bf16 weights (benchmarks/e2e_decode.py build_model). Per shape
(batch x context) every row of benchmarks/headline_rows.py: bf16 / fp8 / int4 caches on zipkv's
static graph decoder, every zipkv quantizing preset, DynamicCache eager, HF StaticCache graph
(the fastest SDPA dispatch), transformers' compiled generate() over a StaticCache, quanto 2-bit.
Per row: ms/step (median of runs, the runs kept), tokens/s, bytes held, peak memory, roofline
((weights + KV bytes) / copy bandwidth measured in the same run), x_roofline, and tokens/s vs
the bf16 and fp8 rows of the same shape and run. Stages (--stage): decode (the grid),
capacity (largest batch under --memory-cap-gib, benchmarks/headline_capacity.py), prefill
(benchmarks/headline_prefill.py). Every row frees its cache before the next one.

    python -m benchmarks.headline --shapes 1x32K,8x32K,16x32K --out $OUT --tag part1      # GPU, ~10 min
    python -m benchmarks.headline --shapes 1x128K,4x128K --out $OUT --tag part2
    python -m benchmarks.headline --stage capacity,prefill --out $OUT --tag part3
    python -m benchmarks.headline --merge part1.json part2.json part3.json --out benchmarks/results
    python -m benchmarks.headline --tiny --device cpu --out /tmp/h                         # CPU smoke run
    python -m benchmarks.headline --plot benchmarks/results/headline_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types

import torch

from benchmarks import e2e_decode as e2e
from benchmarks.headline_rows import HF_STATIC_VARIANTS, Setting, all_rows, measure_row, skip_reason

SHAPES = "1x32K,8x32K,16x32K,1x128K,4x128K"
TINY_SHAPES = "1x96,2x96"
STAGES = ("decode", "capacity", "prefill")
CAPACITY_ROWS = "bf16,fp8,int4,zipkv,zipcache,kivi,uniform"
# the acceptance of issue 19 for the zipkv preset: (what, shapes, bound)
TARGETS = (("x_roofline <=", ("8x32768", "16x32768", "4x131072"), 1.3),
           ("vs_fp8 >=", ("16x32768", "4x131072"), 1.5),
           ("vs_bf16 >=", ("16x32768", "4x131072"), 2.5),
           ("vs_fp8 >=", ("8x32768",), 1.3))
HF_STATIC_NOTE = (
    "hf_static_graph: benchmarks/e2e_decode.py captured model(...) over a StaticCache with no attention mask. "
    "transformers (masking_utils.create_causal_mask) then builds a bool mask over all max_cache_len slots each "
    "decode step (a compileable cache never skips it at q_length 1), so SDPA cannot take its flash kernel; for "
    "GQA, sdpa_attention packs the query heads of a KV head as query rows (pack_gqa, eager) or repeats K/V 4x "
    "(repeat_kv, under torch.compile), and the backend SDPA picks for a masked, packed query decides the step. "
    "This benchmark times the same filled cache under each SDPA dispatch (variants: default; EFFICIENT_ATTENTION "
    "only; CUDNN_ATTENTION only; TRANSFORMERS_SDPA_FORCE_GQA=1, i.e. enable_gqa with the mask) and reports the "
    "fastest as the row; profile_default_dispatch lists the kernels the default dispatch launches at batch > 1 "
    "(the why). hf_generate_static is transformers' own path for a user: generate() over the StaticCache, whose "
    "forward transformers compiles on CUDA (torch.compile, reduce-overhead).")


COMPILED = "+compile"  # the suffix of a --compile part's rows in a merged result


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in (t for t in text.split(",") if t.strip()):
        batch, _, context = item.lower().partition("x")
        shapes.append((int(batch), parse_tokens(context)))
        if shapes[-1][0] < 1 or shapes[-1][1] < 1:
            raise ValueError(item)
    if not shapes:
        raise ValueError(text)
    return shapes


def shape_key(batch: int, context: int) -> str:
    return f"{batch}x{context}"


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- ratios, targets, notes (also after a merge) ------------------------------------------------
def add_ratios(rows: list[dict]) -> None:
    """tokens/s vs the bf16 and fp8 rows of the same shape, the same run (part) and the same
    decoder (a +compile row against the compiled baselines)."""
    for rec in rows:
        suffix = COMPILED if rec["row"].endswith(COMPILED) else ""
        for base in ("bf16", "fp8"):
            ref = next((r for r in rows if r["row"] == base + suffix and "tokens_per_s" in r
                        and r.get("part") == rec.get("part")
                        and (r["batch"], r["context"]) == (rec["batch"], rec["context"])), None)
            if ref is not None and "tokens_per_s" in rec:
                rec[f"vs_{base}"] = rec["tokens_per_s"] / ref["tokens_per_s"]
            else:
                rec.pop(f"vs_{base}", None)


def targets(rows: list[dict], row: str = "zipkv") -> list[dict]:
    """Issue 19's acceptance for the zipkv preset: met or missed, by how much."""
    out = []
    for what, shapes, bound in TARGETS:
        field, op = what.split()
        for key in shapes:
            rec = next((r for r in rows if r["row"] == row and shape_key(r["batch"], r["context"]) == key), None)
            entry = dict(row=row, shape=key, target=f"{field} {op} {bound}")
            value = None if rec is None else rec.get(field)
            if value is None:
                entry["status"] = "not measured"
            else:
                met = value <= bound if op == "<=" else value >= bound
                entry.update(value=value, status="met" if met else "missed",
                             by=(value / bound if op == "<=" else bound / value))
            out.append(entry)
    return out


def notes(rows: list[dict]) -> list[str]:
    lines = [HF_STATIC_NOTE]
    for rec in rows:
        if rec["row"] == "hf_static_graph" and "variants" in rec:
            parts = ", ".join(f"{n} {v['ms_per_step']:.2f} ms" if "ms_per_step" in v else f"{n} failed"
                              for n, v in rec["variants"].items())
            lines.append(f"hf_static_graph {rec['batch']} x {rec['context']}: best {rec.get('best_variant')} ({parts})")
    return lines


def compiled_row(row: str) -> str:
    """The name a row of a --compile run has in a merged result."""
    return row if row.endswith(COMPILED) else row + COMPILED


def summarize(res: dict) -> None:
    add_ratios(res["rows"])
    res["targets"] = targets(res["rows"]) + targets(res["rows"], compiled_row("zipkv"))
    res["notes"] = notes(res["rows"])


# -- run ---------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for <tag>.json and <tag>.png")
    ap.add_argument("--tag", default="headline_h200", help="result file name (default: %(default)s)")
    ap.add_argument("--stage", default="decode", help=f"comma list of {', '.join(STAGES)} (default: %(default)s)")
    ap.add_argument("--shapes", default=None, help=f"batch x context list, K = 1024 (default: {SHAPES}; --tiny: "
                                                   f"{TINY_SHAPES})")
    ap.add_argument("--rows", default="", help="comma list of rows (default: every row; see benchmarks/headline_rows.py)")
    ap.add_argument("--deadline-s", type=float, default=170.0,
                    help="per shape (and per capacity / prefill stage): rows left after this long are recorded as "
                         "skipped (0: none; default: %(default)s)")
    ap.add_argument("--total-s", type=float, default=480.0,
                    help="the whole run: nothing starts after this long, so one call stays under ~10 minutes "
                         "(0: no limit; default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed runs (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per graph row; eager rows time 2 x runs steps")
    ap.add_argument("--cap-s", type=float, default=12.0,
                    help="a row stops timing after this long, with >= 2 runs (eager rows: 3 steps; default: %(default)s)")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps per timed run (0: a zipkv cache's stream_interval, so each run quantizes one block; "
                         "the fp8 / int4 rows 32; the HF StaticCache rows 8)")
    ap.add_argument("--fill", default="kv", choices=("kv", "prefill"),
                    help="how a row's cache gets its context: random K/V through the cache's own update path (kv), "
                         "or the model over random ids in chunks (prefill)")
    ap.add_argument("--prefill-tokens", type=int, default=65536, help="batch x chunk tokens per prefill forward")
    ap.add_argument("--hf-static-variants", default=",".join(HF_STATIC_VARIANTS),
                    help="SDPA dispatches tried for hf_static_graph (default: %(default)s)")
    ap.add_argument("--compile", action="store_true",
                    help="zipkv's decoder rows (bf16 / fp8 / int4 and the zipkv methods) with each decoder layer "
                         "compiled (StaticDecoder(compile=True), inductor)")
    ap.add_argument("--profile", default="", help="rows whose decode step is profiled on CUDA (kernels per step)")
    ap.add_argument("--memory-cap-gib", type=float, default=80.0, help="capacity stage: the cap (default: %(default)s)")
    ap.add_argument("--capacity-rows", default=CAPACITY_ROWS, help="capacity stage rows (default: %(default)s)")
    ap.add_argument("--capacity-contexts", default=None, help="capacity stage contexts (default: 32K,128K; --tiny: 96)")
    ap.add_argument("--capacity-check", default="zipkv", help="the row allocated at its predicted batch ('': none)")
    ap.add_argument("--prefill-lengths", default=None, help="prefill stage lengths (default: 8K,32K; --tiny: 192)")
    ap.add_argument("--prefill-methods", default="dynamic,zipkv,zipcache,kivi,uniform,snapkv,h2o,zipvl,dynamic@4K,zipkv@4K",
                    help="prefill stage methods; NAME@N: a chunked prefill, N tokens per forward (K = 1024)")
    ap.add_argument("--prefill-reps", type=int, default=2, help="timed prefills per case, after one untimed")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy Llama (the CPU smoke run)")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count")
    ap.add_argument("--merge", nargs="+", help="part JSONs to merge into <out>/<tag>.json (+ PNG)")
    ap.add_argument("--plot", help="draw the PNG of a result JSON (beside it) and exit")
    return ap, ap.parse_args(argv)


def check_args(ap, args, methods) -> dict:
    """The parsed lists; a bad value is a usage error naming its option."""
    stages = [s for s in args.stage.split(",") if s]
    if not stages or set(stages) - set(STAGES):
        ap.error(f"--stage: {args.stage!r}; choose from {', '.join(STAGES)}")
    known = all_rows(methods)

    def rows_of(option, text):
        rows = [r for r in text.split(",") if r]
        bad = [r for r in rows if r not in known]
        if bad:
            ap.error(f"{option}: unknown rows {bad}; choose from {', '.join(known)}")
        return rows

    def numbers(option, text, parse):
        try:
            return parse(text)
        except ValueError:
            ap.error(f"{option}: {text!r} is not a list like 1x32K,8x32K (batch x context) / 8K,32K (tokens)")

    bad_variants = set(v for v in args.hf_static_variants.split(",") if v) - set(HF_STATIC_VARIANTS)
    if bad_variants:
        ap.error(f"--hf-static-variants: unknown {sorted(bad_variants)}; choose from {', '.join(HF_STATIC_VARIANTS)}")
    for option, value, low in (("--runs", args.runs, 1), ("--steps", args.steps, 0), ("--warmup", args.warmup, 1), ("--prefill-reps", args.prefill_reps, 1),
                               ("--prefill-tokens", args.prefill_tokens, 1)):
        if value < low:
            ap.error(f"{option} must be >= {low} (got {value})")
    if args.cap_s <= 0 or args.deadline_s < 0 or args.total_s < 0:
        ap.error(f"--cap-s must be > 0, --deadline-s and --total-s >= 0 (got {args.cap_s}, {args.deadline_s}, "
                 f"{args.total_s})")
    if args.memory_cap_gib <= 0:
        ap.error(f"--memory-cap-gib must be > 0 (got {args.memory_cap_gib})")
    tokens = lambda t: [parse_tokens(x) for x in t.split(",") if x.strip()]  # noqa: E731
    check = rows_of("--capacity-check", args.capacity_check)
    prefill = [m for m in args.prefill_methods.split(",") if m]
    from benchmarks.headline_prefill import split_chunk

    try:
        parsed = [split_chunk(m) for m in prefill]
    except ValueError as error:
        ap.error(f"--prefill-methods: {error}")
    bad_prefill = [m for m, (name, _) in zip(prefill, parsed) if name != "dynamic" and name not in methods]
    if bad_prefill:
        ap.error(f"--prefill-methods: unknown {bad_prefill}; choose from dynamic, {', '.join(methods)} "
                 "(NAME@N: in chunks of N tokens)")
    return dict(
        stages=stages,
        shapes=numbers("--shapes", args.shapes or (TINY_SHAPES if args.tiny else SHAPES), parse_shapes),
        rows=rows_of("--rows", args.rows) or known,
        capacity_rows=rows_of("--capacity-rows", args.capacity_rows),
        capacity_contexts=numbers("--capacity-contexts", args.capacity_contexts or ("96" if args.tiny else "32K,128K"),
                                  tokens),
        capacity_check=check[0] if check else None,
        prefill_lengths=numbers("--prefill-lengths", args.prefill_lengths or ("192" if args.tiny else "8K,32K"), tokens),
        prefill_methods=prefill)


def log(line: str) -> None:
    print(line, flush=True)


def row_line(rec: dict) -> str:
    if "ms_per_step" not in rec:
        return f"{rec['row']:20s} {rec['batch']} x {rec['context']}: {rec.get('error', '?')}"
    roof = f", {rec['x_roofline']:.2f}x roofline" if "x_roofline" in rec else ""
    return (f"{rec['row']:20s} {rec['batch']} x {rec['context']}: {rec['ms_per_step']:.2f} ms/step, "
            f"{rec['tokens_per_s']:.1f} tok/s, {rec['bytes_held'] / 2**30:.3f} GiB held, peak {rec['peak_gib']:.1f} GiB"
            f"{roof}, fill {rec['fill']} {rec['fill_s']:.1f} s")


def run(args, lists, argv) -> dict:
    import zipkv

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu" and not args.tiny:
        log("cpu: the tiny model (Llama-3-8B shapes need a GPU)")
        args.tiny = True
    torch.manual_seed(0)
    stop_at = time.perf_counter() + (args.total_s or float("inf"))

    def deadline_from_now() -> float:  # per shape / stage, never past the whole run's
        return min(stop_at, time.perf_counter() + (args.deadline_s or float("inf")))

    model, config = e2e.build_model(types.SimpleNamespace(tiny=args.tiny, layers=args.layers, dtype=args.dtype), device)
    bandwidth = e2e.copy_bandwidth(device)
    w_bytes = e2e.weight_bytes_read(model)
    part = dict(command="python -m benchmarks.headline " + " ".join(argv), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                device=e2e.device_info(device), host=platform.node(), zipkv=zipkv.__version__, commit=commit(),
                model="tiny Llama" if args.tiny else "Llama-3-8B shapes, random bf16 weights",
                layers=config.num_hidden_layers, dtype=args.dtype, copy_bandwidth=bandwidth, weight_bytes=w_bytes,
                fill=args.fill, compile=args.compile, runs=args.runs, steps=args.steps or "stream_interval / 32",
                stages=lists["stages"], shapes=[list(s) for s in lists["shapes"]],
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    res = dict(parts=[part], rows=[], skipped=[], capacity=[], prefill=[])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    s = Setting(model=model, device=device, dtype=getattr(torch, args.dtype), timer=e2e.Timer(device), warmup=args.warmup, runs=args.runs,
                steps=args.steps, cap_s=args.cap_s, fill=args.fill, prefill_tokens=args.prefill_tokens,
                ceiling_gbps=bandwidth.get("gbps", float("nan")), weight_bytes=w_bytes,
                profile=tuple(p for p in args.profile.split(",") if p),
                hf_variants=tuple(v for v in args.hf_static_variants.split(",") if v), compile=args.compile)
    log(f"model: {config.num_hidden_layers} layers, {w_bytes / 1e9:.2f} GB read per step; "
        f"copy {s.ceiling_gbps:.0f} GB/s")
    if "decode" in lists["stages"]:
        rows = []
        for row in lists["rows"]:
            reason = skip_reason(row, zipkv.METHODS)
            if reason:
                res["skipped"].append({"row": row, "reason": reason})
                log(f"skipped {row}: {reason}")
            else:
                rows.append(row)
        for batch, context in lists["shapes"]:
            deadline = deadline_from_now()
            for row in rows:
                if time.perf_counter() > deadline:
                    rec = {"row": row, "batch": batch, "context": context, "error": "skipped: deadline"}
                else:
                    rec = measure_row(row, s, batch, context)
                rec["part"] = 0
                res["rows"].append(rec)
                log(row_line(rec))
                summarize(res)
                save()
    # prefill before capacity: the capacity check ends with an allocation meant to fail
    for stage, runner in (("prefill", run_prefill_stage), ("capacity", run_capacity_stage)):
        if stage in lists["stages"]:
            res[stage].append(dict(runner(args, lists, s, deadline_from_now()), part=0))
            save()
    summarize(res)
    save()
    log(f"wrote {path}")
    write_png(res, os.path.splitext(path)[0] + ".png")
    return res


def run_capacity_stage(args, lists, s, deadline) -> dict:
    from benchmarks.headline_capacity import run_capacity

    import zipkv

    rows = [r for r in lists["capacity_rows"] if not skip_reason(r, zipkv.METHODS)]
    check = lists["capacity_check"] if lists["capacity_check"] in rows else None
    return run_capacity(rows, lists["capacity_contexts"], s, args.memory_cap_gib, check, deadline, log)


def run_prefill_stage(args, lists, s, deadline) -> dict:
    from benchmarks.headline_prefill import run_prefill

    return run_prefill(lists["prefill_methods"], lists["prefill_lengths"], s.model, s.device, args.prefill_reps,
                       s.timer, deadline, log)


def merge(paths: list[str], out: str, tag: str) -> dict:
    """One result from the parts (each its own run): rows, capacity and prefill sections keep
    the index of the part they come from; ratios compare rows of the same part only."""
    res = dict(parts=[], rows=[], skipped=[], capacity=[], prefill=[])
    for i, p in enumerate(paths):
        with open(p) as f:
            part = json.load(f)
        for run_info in part["parts"]:
            res["parts"].append(dict(run_info, file=os.path.basename(p)))
        offset = len(res["parts"]) - len(part["parts"])
        for key in ("rows", "capacity", "prefill"):
            for item in part.get(key, []):
                res[key].append(dict(item, part=offset + item.get("part", 0)))
                if key == "rows" and part["parts"][item.get("part", 0)].get("compile"):
                    # a --compile part's rows beside the others: zipkv+compile, bf16+compile, ...
                    res[key][-1]["row"] = compiled_row(item["row"])
        res["skipped"] += [dict(x, part=offset) for x in part.get("skipped", [])]
    seen = {}
    for rec in res["rows"]:  # a row measured in two parts: the later one counts (an error never hides a figure)
        key = (rec["row"], rec["batch"], rec["context"])
        if "ms_per_step" in rec or "ms_per_step" not in seen.get(key, {}):
            seen[key] = rec
    res["rows"] = list(seen.values())
    res["merged_with"] = "python -m benchmarks.headline --merge " + " ".join(paths) + f" --out {out} --tag {tag}"
    summarize(res)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{tag}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {path}")
    write_png(res, os.path.splitext(path)[0] + ".png")
    return res


def write_png(res: dict, png: str) -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        log("matplotlib not installed: no PNG")
        return
    if not any("ms_per_step" in r for r in res["rows"]):
        log("no decode row measured: no PNG")
        return
    from benchmarks.headline_plot import plot

    log(f"wrote {plot(res, png)}")


def main(argv=None) -> dict:
    import zipkv

    argv = sys.argv[1:] if argv is None else list(argv)
    ap, args = parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            write_png(json.load(f), os.path.splitext(args.plot)[0] + ".png")
        return {}
    if not args.out:
        ap.error("--out is required (the folder for the JSON and PNG)")
    if args.merge:
        return merge(args.merge, args.out, args.tag)
    lists = check_args(ap, args, zipkv.METHODS)
    return run(args, lists, argv)


if __name__ == "__main__":
    main()
