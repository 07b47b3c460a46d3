"""benchmarks/tp_decode.py --tiny: the script the 2-GPU run uses, on the CPU under torchrun with
2 gloo ranks, gives TP=1's greedy tokens with each rank holding half the head-sharded bytes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.tp_decode import main

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_tp2_equals_tp1(tmp_path):
    argv = ["--tiny", "--methods", "zipkv", "--steps", "2", "--prefill-chunk", "32"]
    (single,) = main(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "benchmarks.tp_decode", *argv, "--out", str(tmp_path / "tp2.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads((tmp_path / "tp2.json").read_text())["rows"]
    assert row["tp"] == 2 and single["tp"] == 1
    assert row["tokens"] == single["tokens"] and len(row["tokens"][0]) == 3  # the prefill's token + 2 steps
    assert row["ranks_bytes"][0] == row["ranks_bytes"][1] < single["rank_bytes"]
    assert row["fp16_bytes"] == single["fp16_bytes"]
    # all ranks together hold the single-process bytes plus one copy of the row bookkeeping per extra rank
    assert 0 < row["total_bytes"] - single["total_bytes"] < 0.05 * single["total_bytes"]
