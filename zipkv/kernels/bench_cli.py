"""`zipkv bench` (the kernel benchmarks of benchmarks/kernel_bench.py) and `zipkv bench-e2e`
(the end-to-end decode benchmark of benchmarks/e2e_decode.py: its arguments pass through).

zipkv/cli.py can register it with:
    from zipkv.kernels import bench_cli
    bench_cli.add_parser(subparsers)   # then dispatch args.func(args)
"""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="GPU kernel benchmarks (decode, quantize, probe, sparse prefill)")
    p.add_argument("--stages", default="check,ceiling,grid,quant,probe,sparse",
                   help="comma list of: check, ceiling, sweep, grid, quant, probe, sparse")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--recipes", default="zipcache42,kivi2")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tag", default="kernel_bench")
    p.add_argument("--tuning", default="{}")
    p.add_argument("--sweep", default="")
    p.set_defaults(func=run)
    e2e = subparsers.add_parser(
        "bench-e2e", help="end-to-end decode benchmark (DynamicCache, QuantizedCache, StaticCache+graphs, zipkv caches)",
        description="Whole-model decode steps at real shapes, random weights (benchmarks/e2e_decode.py).",
    )
    try:
        from benchmarks.e2e_decode import add_arguments
    except ImportError:  # installed without the repository's benchmarks/ folder
        add_arguments = None
    if add_arguments is not None:
        add_arguments(e2e)
    e2e.set_defaults(run=run_e2e, e2e_available=add_arguments is not None)
    return p


def run_e2e(args) -> int:
    if not args.e2e_available:
        raise SystemExit("zipkv bench-e2e runs from a checkout of the repository (benchmarks/ is not importable)")
    from benchmarks import e2e_decode

    e2e_decode.main(args=args)
    return 0


def run(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("zipkv bench needs a CUDA GPU (the kernels' CPU paths are the references)")
    try:
        from benchmarks.kernel_bench import run as bench_run
    except ImportError as e:  # installed without the repository's benchmarks/ folder
        raise SystemExit(f"zipkv bench runs from a checkout of the repository (benchmarks/ not importable: {e})")
    return bench_run(args)
