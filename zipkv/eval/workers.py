"""`zipkv eval --workers N`: N processes, each running one shard of the cases, then one result.

Why: a small model on a GPU is host-bound (Python per layer and per token), so one process
leaves the card mostly idle while N processes share it. Each shard is a whole `zipkv eval` run
in OUT/shards/K (its own results file and log, so it resumes on its own after a crash); the
parent shows their combined progress, then merges every shard's rows into OUT/results.jsonl,
from which the summary and plots are made as in a single-process run.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .results import RESULTS_FILE, STATUS_OK, ResultStore

SHARDS_DIR = "shards"
REFERENCES_FILE = "references.jsonl"


def child_argv(args, k: int, n: int, out: Path) -> list[str]:
    """The `zipkv eval` command line of shard k of n (the parent's options, its own folder)."""
    argv = ["eval", "--model", str(args.model), "--tasks", *args.tasks, "--methods", *args.methods,
            "--lengths", *map(str, args.lengths), "--seed", str(args.seed), "--modes", *args.modes,
            "--out", str(out), "--shard", f"{k}/{n}", "--no-plots"]
    for flag, value in (("--count", args.count), ("--device", args.device), ("--dtype", args.dtype),
                        ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if args.depths:
        argv += ["--depths", *map(str, args.depths)]
    return argv


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def run_workers(args, out: Path, console) -> tuple[list[dict[str, Any]], int]:
    """Runs the shards to completion; returns (merged rows, exit status: 0 or the first failure's)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    n = args.workers
    folders = [out / SHARDS_DIR / str(k) for k in range(n)]
    procs = []
    parent_rows = out / RESULTS_FILE
    for k, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        if parent_rows.exists() and not (folder / RESULTS_FILE).exists():
            # rows finished earlier (one process, or other shard counts) are not run again
            shutil.copyfile(parent_rows, folder / RESULTS_FILE)
        log = (folder / "log.txt").open("a", encoding="utf-8")
        cmd = [sys.executable, "-m", "zipkv.eval.cli", *child_argv(args, k, n, folder)]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("", total=None)
            while any(p.poll() is None for p, _ in procs):
                rows = sum(_count_lines(f / RESULTS_FILE) for f in folders)
                running = sum(p.poll() is None for p, _ in procs)
                progress.update(bar, description=f"eval: {rows} rows written, {running}/{n} workers running")
                time.sleep(2.0)
    except KeyboardInterrupt:  # Ctrl-C or `timeout -s INT`: stop the shards, keep what they finished
        for p, _ in procs:
            p.terminate()
        console.print("interrupted: merging the finished cases; rerun the same command to resume")
        interrupted = True
    else:
        interrupted = False
    finally:
        for p, log in procs:
            p.wait()
            log.close()
    status = 130 if interrupted else 0
    for k, (p, _) in enumerate(procs):
        if p.returncode != 0 and not interrupted:
            console.print(f"worker {k} exited with {p.returncode}: see {folders[k] / 'log.txt'}")
            status = status or p.returncode
    return merge(out, folders), status


def merge(out: Path, folders: list[Path]) -> list[dict[str, Any]]:
    """Appends to OUT/results.jsonl (and references.jsonl) every shard row it does not hold yet."""
    for name in (RESULTS_FILE, REFERENCES_FILE):
        target = ResultStore(out, name)
        have = target.done_keys()
        for folder in folders:
            for row in ResultStore(folder, name).latest():
                if row.get("key") not in have:
                    target.append(row)
                    if row.get("status") == STATUS_OK:
                        have.add(row["key"])
    return ResultStore(out).latest()
