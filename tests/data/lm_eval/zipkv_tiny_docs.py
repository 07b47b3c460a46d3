"""The documents of the zipkv_tiny_* lm-eval tasks: zipkv_tiny.jsonl beside this file, read
without the `datasets` download machinery (offline, nothing cached on disk)."""

import json
from pathlib import Path

DOCS = Path(__file__).with_name("zipkv_tiny.jsonl")


def load(**_metadata):
    import datasets

    rows = [json.loads(line) for line in DOCS.read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
