"""`zipkv bench` (the kernel benchmarks) and `zipkv bench-e2e` (the whole-model decode benchmark).

The benchmarks are scripts of the repository (benchmarks/kernel_bench.py,
benchmarks/e2e_decode.py), not shipped in the package, and the package never imports them.
Their options are defined here, so `--help` lists them from any install and the scripts
parse exactly the same options. To run, the subcommand finds a checkout (the current
directory or one above it, or the one an editable install points into) and runs the script
there in a child process (`python -m benchmarks.<name>` with the options as typed); without
a checkout it says which command runs the benchmark from one (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# Results go here unless --out (or $OUT) names a folder: in the current directory, where a
# person finds them, and ignored by git when that directory is a checkout (.gitignore).
DEFAULT_OUT = "zipkv-bench-results"

E2E_CACHES = ("dynamic", "quanto2", "zip_packed", "zip_dequant", "kivi", "zip_graph", "kivi_graph", "zipkv_graph",
              "static_graph")
# Without --shapes: the paper's shapes on a GPU; on a CPU the tiny model at a context that
# runs in about a minute on two cores.
E2E_SHAPES = {"cuda": "1x32768,8x32768", "cpu": "1x256,2x256"}
E2E_TIMING = {  # device type -> bench-e2e timing defaults (None on the command line: these)
    "cuda": {"warmup": 8, "warmup_slow": 2, "reps": 12, "graph_runs": 5, "case_cap_s": 15.0},
    "cpu": {"warmup": 1, "warmup_slow": 1, "reps": 3, "graph_runs": 1, "case_cap_s": 2.0},
}


def timing_default(name: str) -> str:
    return "; ".join(f"{device}: {values[name]}" for device, values in E2E_TIMING.items())


def default_out() -> str:
    return os.environ.get("OUT") or DEFAULT_OUT


def add_kernel_bench_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of benchmarks/kernel_bench.py (also `zipkv bench`'s)."""
    ap.add_argument("--stages", default="check,ceiling,grid,quant,probe,sparse",
                    help="comma list of: check, ceiling, sweep, grid, quant, probe, sparse (default: %(default)s)")
    ap.add_argument("--out", default=default_out(), help="folder for <tag>.json and .png (default: $OUT or %(default)s)")
    ap.add_argument("--contexts", default="4096,32768,131072", help="grid contexts (default: %(default)s)")
    ap.add_argument("--batches", default="1,8,32", help="grid batches (default: %(default)s)")
    ap.add_argument("--recipes", default="zipcache42,kivi2", help="packed cache recipes of the grid (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=20, help="timed replays per case (default: %(default)s)")
    ap.add_argument("--tag", default="kernel_bench", help="result file name (default: %(default)s)")
    ap.add_argument("--tuning", default="", help="json dict of decode tuning for the grid (default: the sweep's best, "
                                                 "else the kernel defaults)")
    ap.add_argument("--sweep", default="", help="json list of tuning dicts for the sweep stage (default: a built-in list)")


def add_e2e_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of benchmarks/e2e_decode.py (also `zipkv bench-e2e`'s)."""
    ap.add_argument("--out", default=default_out(), help="folder for <tag>.json and .png (default: $OUT or %(default)s)")
    ap.add_argument("--tag", default="e2e", help="result file name (default: %(default)s)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="bfloat16", help="model and cache dtype (default: %(default)s)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny Llama (2 layers, hidden 256) instead of Llama-3-8B shapes; always on a CPU")
    ap.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the config's)")
    ap.add_argument("--shapes", default=None, help="batch x context list (default: "
                    + "; ".join(f"{d}: {s}" for d, s in E2E_SHAPES.items()) + ")")
    ap.add_argument("--caches", default=",".join(E2E_CACHES), help="comma list of: %(default)s")
    ap.add_argument("--floor-context", type=int, default=128,
                    help="also time DynamicCache at this context per batch (weights + overhead floor); 0: off")
    ap.add_argument("--profile", default="all",
                    help="caches profiled at the largest shape ('all': every cache, contexts >= 1024; '': none)")
    ap.add_argument("--fill-chunk-mb", type=float, default=256, help="fp16 K+V per zipkv fill chunk (default: %(default)s)")
    ap.add_argument("--max-batch", default="dynamic,zip_packed",
                    help="caches for the largest-batch search, GPU only ('': none; default: %(default)s)")
    ap.add_argument("--max-batch-context", type=int, default=0, help="0: the largest context of --shapes")
    ap.add_argument("--max-tries", type=int, default=4, help="largest-batch tries per cache (default: %(default)s)")
    # timing defaults per device (E2E_TIMING): a CPU run is a smoke run of the tiny model that
    # should finish in about a minute, a GPU run times enough steps for stable medians
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: " + timing_default("warmup") + ")")
    ap.add_argument("--warmup-slow", type=int, default=None,
                    help="the same for quanto2 and zip_dequant (default: " + timing_default("warmup_slow") + ")")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per case (default: " + timing_default("reps") + ")")
    ap.add_argument("--graph-runs", type=int, default=None,
                    help="graph caches: timed runs of K steps each (default: " + timing_default("graph_runs") + ")")
    ap.add_argument("--case-cap-s", type=float, default=None,
                    help="stop timing a case after this long, >= 3 steps (default: " + timing_default("case_cap_s") + ")")
    ap.add_argument("--deadline-s", type=float, default=0, help="skip what is left after this long (0: none)")
    ap.add_argument("--plot", default="", help="only plot this JSON (PNG beside it)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="GPU kernel benchmarks (decode, quantize, probe, sparse prefill); needs a checkout",
        description="Kernel benchmarks on the GPU (benchmarks/kernel_bench.py of a zipkv checkout): correctness "
                    "against the references, the copy ceiling, decode attention vs fp16 SDPA, quantize+pack, "
                    "probe scores, sparse prefill.")
    add_kernel_bench_arguments(p)
    p.set_defaults(run=run)
    e2e = subparsers.add_parser(
        "bench-e2e", help="end-to-end decode benchmark (DynamicCache, QuantizedCache, StaticCache+graphs, zipkv "
                          "caches); needs a checkout",
        description="Whole-model decode steps at real shapes, random weights (benchmarks/e2e_decode.py of a zipkv "
                    "checkout). On a CPU: the tiny model, small shapes.")
    add_e2e_arguments(e2e)
    e2e.set_defaults(run=run_e2e)
    return p


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("zipkv bench needs a CUDA GPU (the kernels' CPU paths are the references); "
                         "`zipkv bench-e2e --tiny` runs on a CPU")
    return run_checkout_script("kernel_bench", args)


def run_e2e(args) -> int:
    return run_checkout_script("e2e_decode", args)


def run_checkout_script(name: str, args) -> int:
    """Run benchmarks/<name>.py of a checkout with the options the user typed; its exit
    status. The results record the command as typed (`zipkv bench-e2e ...`)."""
    typed = list(getattr(args, "argv", None) or [args.command])
    options = typed[typed.index(args.command) + 1:] if args.command in typed else typed[1:]
    root = find_checkout(name)
    if root is None:
        raise SystemExit(
            f"zipkv {args.command}: the benchmark is a script of the zipkv repository (benchmarks/{name}.py), "
            "which the installed package does not ship, and no checkout is at or above the current directory.\n"
            f"Run it from the root of a zipkv checkout:\n    python -m benchmarks.{name} {' '.join(options)}".rstrip())
    env = dict(os.environ, ZIPKV_BENCH_COMMAND=" ".join(["zipkv", *typed]))
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *options], env=env)


def find_checkout(name: str, start: Path | None = None) -> Path | None:
    """The nearest folder at or above `start` (default: the current directory) holding
    benchmarks/<name>.py beside zipkv/, else the checkout this package is imported from."""
    start = Path.cwd() if start is None else start
    for folder in (start, *start.parents, Path(__file__).resolve().parent.parent):
        if (folder / "benchmarks" / f"{name}.py").is_file() and (folder / "zipkv").is_dir():
            return folder
    return None
