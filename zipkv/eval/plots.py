"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- score_vs_ratio.png: per task, mean score against mean real compression ratio, one
  point per method (averaged over lengths); points of one method name joined by a line.
- overview.png: per length, the mean score over tasks against the mean real ratio, one point
  per method setting; only methods that ran every task at that length (like with like);
  settings of one method name joined by a line.
- heatmap_<task>.png: for tasks whose cases have a depth, mean score by depth x length,
  one panel per method.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .results import STATUS_OK


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score_vs_ratio(rows: Iterable[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r.get("status") == STATUS_OK and r.get("ratio") is not None]
    if not rows:
        return None
    plt = _pyplot()
    tasks = sorted({r["task"] for r in rows})
    cols = min(4, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    names = sorted({r["method"] for r in rows})
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    # shapes and shrinking sizes keep methods that land on the same point (full vs a
    # lossless baseline) visible
    markers = {n: "osD^vPX*<>"[i % 10] for i, n in enumerate(names)}
    sizes = {n: max(14, 64 - 8 * i) for i, n in enumerate(names)}
    for ax, task in zip(axes.flat, tasks):
        points: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r["task"] == task:
                points[(r["method"], r["method_label"], r["mode"])].append((r["ratio"], r["score"]))
        lines: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for (name, label, mode), pts in points.items():
            x, y = _mean([p[0] for p in pts]), _mean([p[1] for p in pts])
            lines[(name, mode)].append((x, y))
        for (name, mode), pts in sorted(lines.items()):
            pts.sort()
            style = "-" if mode == "after" else "--"
            face = colors[name] if mode == "after" else "none"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[name], alpha=0.6)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colors[name], facecolors=face, zorder=3,
                       marker=markers[name], s=sizes[name],
                       label=name if mode == "after" else f"{name} (question inside)")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("real compression ratio (fp16 bytes / bytes held)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _family(name: str) -> tuple[str, str]:
    """(family label, colour) of a method name: who made it, for the overview's legend."""
    if name.startswith("kvpress-"):
        return "kvpress (NVIDIA)", "tab:red"
    if name.startswith("hf-"):
        return "HF QuantizedCache", "tab:green"
    if name in ("full",):
        return "full cache", "black"
    if name in ("zipkv", "zipcache", "kivi", "uniform"):
        return "zipkv quantization", "tab:blue"
    return "zipkv eviction / tiers", "tab:orange"


def overview(rows: Iterable[dict[str, Any]], path: Path) -> Path | None:
    from .summary import summarize

    rows = [r for r in rows if r.get("status") == STATUS_OK and r.get("ratio") is not None and r["mode"] == "after"]
    if not rows:
        return None
    name_of = {r["method_label"]: r["method"] for r in rows}
    table = summarize(rows)  # one row per (task, length, method setting): its mean score and ratio
    plt = _pyplot()
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.2 * len(lengths), 5.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        here = [t for t in table if t["length"] == length]
        tasks = {t["task"] for t in here}
        by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for t in here:
            by_label[t["method"]].append(t)
        lines: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for label, ts in by_label.items():
            if {t["task"] for t in ts} != tasks:
                continue  # a method that missed a task would be averaged over easier ones
            score, ratio = _mean([t["score"] for t in ts]), _mean([t["ratio"] for t in ts])
            lines[name_of[label]].append((ratio, score, label))
        for name, pts in sorted(lines.items()):
            family, color = _family(name)
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, alpha=0.5)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, s=28, zorder=3, label=family)
            for x, y, label in pts:
                short = label.replace("kvpress-", "kvp-").replace(":compression_ratio=", "@").replace(":ratio=", "@")
                ax.annotate(short.replace(":bits=", "-").replace(":nbits=", "-"), (x, y), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
        ax.set_title(f"{length} tokens: mean score over {len(tasks)} tasks", fontsize=10)
        ax.set_xlabel("real compression ratio (fp16 bytes / bytes held)")
        ax.set_ylabel("mean score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for h, l in zip(*axes[0][0].get_legend_handles_labels()):
        if l not in labels:
            handles.append(h)
            labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _depth_rows(depths: list[float], bins: int) -> tuple[list[str], callable]:
    """Row labels and a depth -> row function: the exact depths when there are few
    (passkey, NIAH), else `bins` equal bins (reading tasks, whose depths vary)."""
    exact = sorted({round(d, 2) for d in depths})
    if len(exact) <= 8:
        return [f"{d:.2f}" for d in exact], lambda d: exact.index(round(d, 2))
    return [f"{b / bins:.1f}-{(b + 1) / bins:.1f}" for b in range(bins)], lambda d: min(bins - 1, int(d * bins))


def depth_heatmaps(rows: Iterable[dict[str, Any]], out_dir: Path, bins: int = 5) -> list[Path]:
    rows = [r for r in rows if r.get("status") == STATUS_OK and r.get("depth") is not None]
    plt = _pyplot()
    paths = []
    for task in sorted({r["task"] for r in rows}):
        trs = [r for r in rows if r["task"] == task and r["mode"] == "after"] or [r for r in rows if r["task"] == task]
        lengths = sorted({r["length"] for r in trs})
        methods = sorted({r["method_label"] for r in trs})
        labels, row_of = _depth_rows([r["depth"] for r in trs], bins)
        width = 1.5 + len(methods) * (0.9 + 0.6 * len(lengths))
        fig, axes = plt.subplots(1, len(methods), figsize=(width, 1.2 + 0.4 * len(labels)), squeeze=False, sharey=True)
        image = None
        for ax, method in zip(axes[0], methods):
            cells: dict[tuple[int, int], list[float]] = defaultdict(list)
            for r in trs:
                if r["method_label"] == method:
                    cells[(row_of(r["depth"]), lengths.index(r["length"]))].append(r["score"])
            grid = [[_mean(cells.get((b, j), [])) for j in range(len(lengths))] for b in range(len(labels))]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
            ax.set_xlabel("length", fontsize=8)
            ax.set_title(method, fontsize=7)
        axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
        axes[0][0].set_ylabel("depth")
        fig.suptitle(f"{task}: score by depth and length", fontsize=10, y=1.0 + 0.25 / (1.2 + 0.4 * len(labels)))
        if image is not None:
            fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
        path = Path(out_dir) / f"heatmap_{task}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def plot_all(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [score_vs_ratio(rows, out_dir / "score_vs_ratio.png"), overview(rows, out_dir / "overview.png")]
    made += depth_heatmaps(rows, out_dir)
    return [p for p in made if p is not None]
