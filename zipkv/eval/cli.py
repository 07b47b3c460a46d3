"""`zipkv eval`: quality vs real compression, offline, on the embedded model or yours.

Imports stay light at module level: `zipkv --help` imports every subcommand module.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_METHODS = ("full", "zipkv", "zipcache", "kivi", "uniform")
DEFAULT_LENGTHS = (1024,)
TINY = "tiny-random"

EPILOG = """\
methods: NAME[:key=value,...]; every zipkv method (`zipkv methods` lists them: full, zipkv,
  zipcache, kivi, snapkv, minicache, ...) takes its make_cache parameters, e.g.
  zipcache:high_bits=4,low_bits=2,salient_ratio=0.6 or snapkv:ratio=0.2; checked before the
  model loads.
  Baselines: hf-dynamic (transformers DynamicCache), hf-quanto:nbits=2|4, hf-hqq:nbits=..,
  hf-fp8 (transformers QuantizedCache), kvpress-snapkv:compression_ratio=0.5 (needs kvpress,
  which needs transformers<5.3).
tasks: names or groups (default, ruler, retrieval, qa, lm, all); --list shows them.
The run appends one JSON line per finished case to OUT/results.jsonl: rerun the same
command to resume after a crash or Ctrl-C. At the end: OUT/summary.{csv,md} and PNG plots.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="measure quality vs real compression on offline tasks",
        description="Evaluate KV-cache compression methods on offline tasks (passkey, RULER, "
        "reading comprehension, language modelling, generation agreement).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a named model "
                   "(`zipkv models`: qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), a local model "
                   f"directory or .gguf file, or '{TINY}' (random weights, pipeline smoke test)")
    p.add_argument("--tasks", nargs="+", default=["default"], help="task names or groups (default: the quick suite)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="method specs (default: %(default)s)")
    p.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS), help="prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="case generation seed (default: 0)")
    p.add_argument("--count", type=int, default=None, help="cases per task and length (default: each task's own)")
    p.add_argument("--depths", nargs="+", type=float, default=None, help="needle depths in [0, 1]")
    p.add_argument("--modes", nargs="+", default=["after"], choices=["after", "inside"],
                   help="after: question decoded after the compressed context (default); inside: prefilled with it")
    p.add_argument("--out", default=None, help="output folder (default: eval_runs/MODEL-seedN); reruns resume it")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the device, each a shard of the cases (default: 1); "
                   "their rows are merged into OUT/results.jsonl")
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)  # k/n: set by --workers for each worker
    p.add_argument("--list", action="store_true", help="list tasks and groups, then exit")
    return p


def _list_tasks() -> None:
    from .tasks import GROUPS, TASKS

    print("tasks (name, family, default cases per length, text source):")
    for spec in TASKS.values():
        print(f"  {spec.name:24s} {spec.family:12s} {spec.default_count:3d}  {spec.source}")
    print("groups:")
    for name, members in GROUPS.items():
        print(f"  {name:10s} {', '.join(members)}")


def _model_tag(model: str) -> str:
    if model in ("default", TINY):
        return model
    return Path(model).name.removesuffix(".gguf") or "model"


def _load(args):
    import torch

    if args.model == TINY:
        from .tiny import tiny_random_model

        return tiny_random_model(), TINY
    from zipkv.models import find_default_gguf, load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    model, tokenizer = load_model(args.model, dtype=dtype, device=device, argument="--model")
    name = f"embedded:{find_default_gguf().name}" if args.model == "default" else str(args.model)
    return (model, tokenizer), name


def _parse_shard(text):
    if text is None:
        return (0, 1)
    try:
        k, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like k/n, got {text!r}") from None
    return (k, n)


def run(args) -> int:
    if args.list:
        _list_tasks()
        return 0
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .methods import MethodSpec, check_methods
    from .runner import EvalConfig, Runner
    from .sources import DataSourceMissing
    from .tasks import DEFAULT_DEPTHS

    console = Console(stderr=True)
    try:
        specs = [MethodSpec.parse(m) for text in args.methods for m in text.split() if m]
        check_methods(specs)  # a bad name or value is an error before any model loads
        out = Path(args.out or f"eval_runs/{_model_tag(args.model)}-seed{args.seed}")
        config = EvalConfig(
            tasks=args.tasks, lengths=args.lengths, methods=specs, out_dir=out, seed=args.seed,
            modes=list(dict.fromkeys(args.modes)), count=args.count,
            depths=tuple(args.depths) if args.depths else DEFAULT_DEPTHS, model_name=_model_tag(args.model),
            shard=_parse_shard(args.shard),
        )
        if args.workers < 1:
            raise ValueError(f"workers must be >= 1, got {args.workers}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        if args.workers == 1:
            (model, tokenizer), config.model_name = _load(args)
    except ValueError as e:
        args.parser.error(str(e))
        return 2
    if args.workers > 1:
        from .workers import run_workers

        rows, status = run_workers(args, out, console)
        return _report(args, rows, out, status, console)

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
    status = 0
    rows = []
    try:
        with progress:
            runner = Runner(model, tokenizer, config, progress=progress, log=lambda m: console.print(m))
            rows = runner.run()
    except KeyboardInterrupt:
        console.print(f"interrupted: finished cases are in {out / 'results.jsonl'}; rerun the same command to resume")
        status = 130
    except DataSourceMissing as e:
        console.print(f"zipkv eval: {e}")
        return 1
    except ValueError as e:
        args.parser.error(str(e))
        return 2
    from .results import ResultStore

    return _report(args, rows or ResultStore(out).latest(), out, status, console)


def _report(args, rows, out, status, console) -> int:
    from rich.console import Console

    from . import plots, summary
    from .results import STATUS_OK

    if not rows:
        console.print("no results yet")
        return status
    if not any(row.get("status") == STATUS_OK for row in rows):
        # a run whose every case failed is a failed run, whatever the summary says
        console.print(f"zipkv eval: every case failed ({len(rows)} rows); the errors are in {out / 'results.jsonl'}")
        status = status or 1
    table = summary.summarize(rows)
    # piped output: wide enough for every column instead of rich's 80-column default
    summary.print_table(table, Console(width=None if sys.stdout.isatty() else 200))
    paths = summary.write(table, out)
    made = [] if args.no_plots else plots.plot_all(rows, out)
    console.print("wrote " + ", ".join(str(p) for p in list(paths.values()) + made))
    return status


def main(argv=None) -> int:  # `python -m zipkv.eval.cli` without the zipkv front end
    parser = argparse.ArgumentParser(prog="zipkv")
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_parser(sub)
    p.set_defaults(parser=p)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
