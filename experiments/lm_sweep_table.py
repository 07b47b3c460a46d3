"""The LM sweep's rows by method: mean KL from the full cache's next-token distribution, mean
top-1 agreement and the real ratio (fp16 bytes / bytes held at the end of the case):

    python experiments/lm_sweep_table.py experiments/results/lm_sweep_15_fp32/results.jsonl
"""

import collections
import json
import statistics
import sys


def main(path: str) -> None:
    rows = collections.defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        if r.get("status", "ok") == "ok" and "kl" in (r.get("metrics") or {}):
            rows[r["method_label"]].append(r)
    print("| method | cases | mean KL | top-1 agreement | real ratio |\n|---|---|---|---|---|")
    for label, rs in sorted(rows.items(), key=lambda kv: statistics.mean(r["metrics"]["kl"] for r in kv[1])):
        kl = statistics.mean(r["metrics"]["kl"] for r in rs)
        top1 = statistics.mean(r["score"] for r in rs)
        ratio = statistics.mean(r["ratio"] for r in rs)
        print(f"| {label} | {len(rs)} | {kl:.4f} | {top1:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
