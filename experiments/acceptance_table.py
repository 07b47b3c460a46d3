"""Issue 17's acceptance table, read from committed `zipkv eval` results (no model is run).

    python experiments/acceptance_table.py                      # the Qwen2.5 result folders
    python experiments/acceptance_table.py results/eval-smollm2 --print-only

For each results folder: every method's mean suite score as % of the full cache's and its real
compression ratio, then the issue's criteria, written as DIR/acceptance.json and
DIR/acceptance.md (with --print-only: printed, nothing written).

How the numbers are made (why, in short):
- Common cases: every method that finished most of full's cases is scored on the same cases
  (those it, full and every other such method finished), as the mean over tasks of each task's
  mean (zipkv.eval.summary.overall's weighting), so a run cut short compares like with like.
  A method with fewer cases is shown `partial`, paired with full on its own cases, and left out
  of the verdicts.
- Ratio: fp16 bytes of the same tokens / bytes really held at the end of the case (the rows'
  `ratio`), averaged the same way.
- zipkv recipes: the registry's quantizing methods but KIVI (zipkv, zipcache, uniform,
  rotated*, auto); KIVI, quanto, int4 and kvpress presses are the competitors the issue names;
  fp8 is the reference of the last criterion.
- "at equal or fewer bytes": the recipe's ratio >= the competitor's / (1 + BYTES_TOLERANCE),
  since two methods never hold exactly the same bytes. "above" is strict; a tie is shown as one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from zipkv.eval.results import ResultStore, ok_rows
from zipkv.registry import names

DEFAULT_DIRS = ("results/eval-qwen2.5-coder-0.5b", "results/eval-qwen2.5-coder-1.5b")
BYTES_TOLERANCE = 0.02
MIN_COVERAGE = 0.5  # a method with fewer of full's cases is shown (partial) but not in the verdicts
FP8_FEWER_BYTES = 2.5  # the recipe holds >= 2.5x fewer bytes than fp8 ...
FP8_WITHIN = 0.97  # ... and keeps >= 97% of fp8's score ("within 3%")
# (ratio, share of full's score): the targets; the embedded model (rows name it
# "embedded:FILE.gguf") has its own
EMBEDDED_TARGETS = ((5.0, 0.90),)
QWEN_TARGETS = ((5.0, 0.97), (6.4, 0.93))


def targets_for(model: str):
    return EMBEDDED_TARGETS if model == "default" or model.startswith("embedded:") else QWEN_TARGETS
ZIPKV_RECIPES = tuple(n for n in names("quantize") if n != "kivi")


def role(row: dict) -> str:
    name = row["method"]
    if name == "full":
        return "full"
    if name == "fp8":
        return "fp8"
    if name in ZIPKV_RECIPES:
        return "zipkv"
    if name in ("kivi", "int4") or name.startswith(("kvpress-", "hf-quanto")):
        return "competitor"
    return "other"


def case_key(row: dict) -> tuple:
    return (row["task"], row["length"], row["case_id"], row["mode"])


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def task_weighted(rows: list[dict], field: str) -> float:
    """Mean over tasks of each task's mean of `field` (every task weighs the same)."""
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r.get(field))
    return mean(mean(v) for v in by_task.values())


def lm_kl(rows: list[dict]) -> float:
    """Mean over the language-modelling tasks of each one's mean KL from the full cache's
    next-token distribution (NaN without such rows): a steadier signal than their top-1
    agreement, which moves in steps of 1/64 a case."""
    by_task = defaultdict(list)
    for r in rows:
        if "kl" in (r.get("metrics") or {}):
            by_task[r["task"]].append(r["metrics"]["kl"])
    return mean(mean(v) for v in by_task.values())


def method_table(rows: list[dict]) -> tuple[list[dict], set]:
    """The per-method rows, and the common cases: those finished by full and by every method
    that finished at least MIN_COVERAGE of full's cases (a run cut short mid-case leaves its
    last case to some methods only; that case drops out instead of those methods)."""
    by_method: dict[str, dict[tuple, dict]] = defaultdict(dict)
    for r in ok_rows(rows):
        by_method[r["method_label"]][case_key(r)] = r
    if "full" not in by_method:
        raise SystemExit("no finished `full` rows: the table is relative to the full cache")
    full = by_method["full"]
    covering = [set(c) & set(full) for c in by_method.values() if len(set(c) & set(full)) >= MIN_COVERAGE * len(full)]
    common = set.intersection(*covering)
    table = []
    for label, cases in sorted(by_method.items()):
        complete = common <= set(cases)
        shared = sorted(common if complete else set(cases) & set(full))
        if not shared:
            continue
        mine = [cases[k] for k in shared]
        ref = [full[k] for k in shared]
        score, full_score = task_weighted(mine, "score"), task_weighted(ref, "score")
        table.append({
            "method": label, "role": role(mine[0]), "cases": len(shared), "tasks": len({r["task"] for r in mine}),
            "complete": complete, "score": score, "full_score": full_score,
            "pct_of_full": score / full_score if full_score else float("nan"),
            "ratio": task_weighted(mine, "ratio"), "bytes_held": task_weighted(mine, "bytes_held"),
            "lm_kl": lm_kl(mine),
        })
    return table, common


def fewer_or_equal_bytes(recipe: dict, other: dict, factor: float = 1.0) -> bool:
    return recipe["ratio"] >= factor * other["ratio"] / (1 + BYTES_TOLERANCE)


def target_criteria(table: list[dict], targets) -> list[dict]:
    recipes = [m for m in table if m["role"] == "zipkv" and m["complete"]]
    out = []
    for ratio, share in targets:
        at = [m for m in recipes if m["ratio"] >= ratio]
        best = max(at, key=lambda m: m["pct_of_full"], default=None)
        out.append({
            "criterion": f">= {share:.0%} of full at >= {ratio:g}x",
            "met": bool(best and best["pct_of_full"] >= share),
            "best": best and {k: best[k] for k in ("method", "pct_of_full", "ratio")},
            "recipes_at_ratio": [m["method"] for m in at],
        })
    return out


def competitor_criterion(table: list[dict]) -> dict:
    """Each competitor against the best-scoring zipkv recipe that holds equal or fewer bytes."""
    recipes = [m for m in table if m["role"] == "zipkv" and m["complete"]]
    rows = []
    for c in (m for m in table if m["role"] == "competitor" and m["complete"]):
        cheaper = [r for r in recipes if fewer_or_equal_bytes(r, c)]
        best = max(cheaper, key=lambda r: (r["score"], r["ratio"]), default=None)
        if best is None:
            verdict = "no recipe at these bytes"
        else:
            verdict = "above" if best["score"] > c["score"] else "tie" if best["score"] == c["score"] else "below"
        rows.append({
            "competitor": c["method"], "competitor_score": c["score"], "competitor_ratio": c["ratio"],
            "recipe": best and best["method"], "recipe_score": best and best["score"],
            "recipe_ratio": best and best["ratio"], "verdict": verdict,
        })
    return {
        "criterion": "best zipkv recipe above every kvpress press / quanto / KIVI / int4 at equal or fewer bytes",
        "met": bool(rows) and all(r["verdict"] == "above" for r in rows),
        "competitors": rows,
    }


def fp8_criterion(table: list[dict]) -> dict:
    fp8 = next((m for m in table if m["role"] == "fp8" and m["complete"]), None)
    crit = {"criterion": f"within {1 - FP8_WITHIN:.0%} of fp8 at >= {FP8_FEWER_BYTES:g}x fewer bytes than fp8"}
    if fp8 is None:
        return {**crit, "met": False, "note": "no complete fp8 rows"}
    at = [m for m in table if m["role"] == "zipkv" and m["complete"] and fewer_or_equal_bytes(m, fp8, FP8_FEWER_BYTES)]
    best = max(at, key=lambda m: m["score"], default=None)
    return {
        **crit, "fp8_score": fp8["score"], "fp8_ratio": fp8["ratio"],
        "met": bool(best and best["score"] >= FP8_WITHIN * fp8["score"]),
        "best": best and {"method": best["method"], "score": best["score"], "ratio": best["ratio"],
                          "share_of_fp8": best["score"] / fp8["score"] if fp8["score"] else float("nan")},
    }


def acceptance(results_dir: Path) -> dict:
    rows = ResultStore(results_dir).latest()
    if not rows:
        raise SystemExit(f"{results_dir}: no results.jsonl rows")
    table, common = method_table(rows)
    model = rows[0]["model"]
    env = {k: sorted({str(r.get(k)) for r in rows}) for k in ("device", "dtype", "transformers_version", "zipkv_version")}
    return {
        "source": str(results_dir / "results.jsonl"), "model": model, "environment": env,
        "cases": len(common), "tasks": sorted({k[0] for k in common}),
        "lengths": sorted({k[1] for k in common}), "methods": table,
        "criteria": target_criteria(table, targets_for(model)) + [competitor_criterion(table), fp8_criterion(table)],
    }


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def to_markdown(acc: dict) -> str:
    lines = [
        f"# Acceptance table (issue 17): {acc['model']}",
        "",
        f"From `{acc['source']}` by `experiments/acceptance_table.py`: {acc['cases']} common cases "
        f"({', '.join(acc['tasks'])}; lengths {', '.join(map(str, acc['lengths']))}); "
        + ", ".join(f"{k} {'/'.join(v)}" for k, v in acc["environment"].items()) + ".",
        "Score: mean over tasks of each task's mean on the common cases (partial: on the method's own "
        "cases, paired with full); ratio: fp16 bytes of the same tokens / bytes held; LM KL: mean KL of the "
        "next-token distribution from the full cache's on the language-modelling tasks' cases.",
        "",
        "| method | role | cases | score | % of full | real ratio | LM KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in sorted(acc["methods"], key=lambda m: (-m["pct_of_full"], m["method"])):
        cases = f"{m['cases']}" + ("" if m["complete"] else " (partial)")
        kl = "-" if math.isnan(m.get("lm_kl", float("nan"))) else f"{m['lm_kl']:.4f}"
        lines.append(f"| {m['method']} | {m['role']} | {cases} | {m['score']:.3f} | {_pct(m['pct_of_full'])} | "
                     f"{m['ratio']:.2f}x | {kl} |")
    lines += ["", "## Criteria", ""]
    for c in acc["criteria"]:
        lines.append(f"- **{c['criterion']}**: {'met' if c['met'] else 'not met'}")
        if "competitors" in c:
            for r in c["competitors"]:
                rec = "none" if r["recipe"] is None else f"{r['recipe']} {r['recipe_score']:.3f} at {r['recipe_ratio']:.2f}x"
                lines.append(f"  - {r['competitor']} {r['competitor_score']:.3f} at {r['competitor_ratio']:.2f}x vs {rec}: {r['verdict']}")
        elif "fp8_score" in c:
            b = c["best"]
            rec = "no recipe at those bytes" if b is None else f"{b['method']} {b['score']:.3f} at {b['ratio']:.2f}x ({_pct(b['share_of_fp8'])} of fp8)"
            lines.append(f"  - fp8 {c['fp8_score']:.3f} at {c['fp8_ratio']:.2f}x; best recipe: {rec}")
        elif "note" in c:
            lines.append(f"  - {c['note']}")
        else:
            b = c["best"]
            lines.append("  - best: " + ("no complete zipkv recipe at that ratio" if b is None
                                          else f"{b['method']} {_pct(b['pct_of_full'])} of full at {b['ratio']:.2f}x"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="*", default=list(DEFAULT_DIRS), help="zipkv eval output folders")
    p.add_argument("--print-only", action="store_true", help="print the tables, write nothing")
    args = p.parse_args(argv)
    for d in map(Path, args.dirs):
        acc = acceptance(d)
        md = to_markdown(acc)
        print(md)
        if not args.print_only:
            (d / "acceptance.json").write_text(json.dumps(acc, indent=1) + "\n", encoding="utf-8")
            (d / "acceptance.md").write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
