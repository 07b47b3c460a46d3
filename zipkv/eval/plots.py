"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- score_vs_ratio.png: per task, mean score against mean real compression ratio, one
  point per method (averaged over lengths); points of one method name joined by a line.
- overview.png: per length, the mean score over tasks against the mean real ratio, one point
  per method setting; only methods that ran every task at that length (like with like);
  settings of one method name joined by a line; labels placed so that none overlaps another
  label or a marker (place_labels).
- heatmap_<task>.png: for tasks whose cases have a depth, mean score by depth x length,
  one panel per method.

`python -m zipkv.eval.plots OUT` redraws them from OUT/results.jsonl, without a model.
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
    fig = overview_figure(rows)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def overview_figure(rows: Iterable[dict[str, Any]]):
    """overview.png's figure (None without ok rows): one panel per length, each method setting a
    labelled point (labels placed apart: place_labels), settings of one method joined by a line."""
    from .summary import summarize

    rows = [r for r in rows if r.get("status") == STATUS_OK and r.get("ratio") is not None and r["mode"] == "after"]
    if not rows:
        return None
    name_of = {r["method_label"]: r["method"] for r in rows}
    table = summarize(rows)  # one row per (task, length, method setting): its mean score and ratio
    plt = _pyplot()
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(7.0 * len(lengths), 6.0), squeeze=False)
    panels = []
    for ax, length in zip(axes[0], lengths):
        here = [t for t in table if t["length"] == length]
        named_points: list[tuple[float, float, str]] = []
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
            named_points += [(x, y, short_label(label)) for x, y, label in pts]
        panels.append((ax, named_points))
        ax.margins(x=0.1)  # room for the labels of the outermost points
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
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # before the labels: they are placed in the final layout
    for ax, points in panels:
        place_labels(ax, points, fontsize=6)
    return fig


def short_label(label: str) -> str:
    """A method setting as the overview writes it: kvp-snapkv@0.5, kivi-2, snapkv@0.2."""
    short = label.replace("kvpress-", "kvp-").replace(":compression_ratio=", "@").replace(":ratio=", "@")
    return short.replace(":bits=", "-").replace(":nbits=", "-")


# Where a label may go, in points from its marker: nearest first, then further out in 16
# directions (a leader line joins a label to its marker once it is more than a step away).
LABEL_RADII = (3, 9, 16, 24, 34, 46, 60, 76, 94)
LABEL_DIRECTIONS = 16
MARKER_RADIUS_PX = 4
LINE_PENALTY = 20  # points: how much further a label may sit to stay off the lines


def label_offsets() -> list[tuple[float, float]]:
    offsets = []
    for r in LABEL_RADII:
        for k in range(LABEL_DIRECTIONS):
            angle = 2 * math.pi * k / LABEL_DIRECTIONS + math.pi / 8  # up-right first
            offsets.append((r * math.cos(angle), r * math.sin(angle)))
    return offsets


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: float = 6) -> list:
    """Annotate each (x, y, text) of `points` so that no label overlaps another label or a
    marker and every label stays inside the axes: greedily, most crowded points first, each
    label at the free offset of label_offsets() nearest its marker, a label that crosses a
    plotted line counting LINE_PENALTY points further away; a thin leader line joins a label
    that had to move away. A label with no free place takes its nearest place inside the axes.
    Call it once the figure's layout is final (after tight_layout): boxes are measured in
    display pixels. Returns the annotations."""
    import numpy as np

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    px_per_point = fig.dpi / 72.0
    centers = [tuple(ax.transData.transform((x, y))) for x, y, _ in points]
    r = MARKER_RADIUS_PX
    taken = [(cx - r, cy - r, cx + r, cy + r) for cx, cy in centers]  # x0, y0, x1, y1
    lines = [ax.transData.transform(line.get_xydata()) for line in ax.get_lines()]
    samples = np.array([p for xy in lines for p in line_samples(xy)] or [(-1e9, -1e9)])
    offsets = np.array(label_offsets())
    distance = np.hypot(offsets[:, 0], offsets[:, 1])
    # anchor of the text box per offset: left / right / centre, bottom / top / centre
    ha = np.where(offsets[:, 0] > 1, 0.0, np.where(offsets[:, 0] < -1, 1.0, 0.5))
    va = np.where(offsets[:, 1] > 1, 0.0, np.where(offsets[:, 1] < -1, 1.0, 0.5))

    def crowd(i):
        cx, cy = centers[i]
        return -sum(abs(cx - ox) < 60 and abs(cy - oy) < 30 for ox, oy in centers)

    made = []
    for i in sorted(range(len(points)), key=crowd):
        x, y, text = points[i]
        probe = ax.text(0, 0, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        w, h = extent.width, extent.height
        x0 = centers[i][0] + offsets[:, 0] * px_per_point - ha * w
        y0 = centers[i][1] + offsets[:, 1] * px_per_point - va * h
        x1, y1 = x0 + w, y0 + h
        inside = (x0 >= frame.x0) & (y0 >= frame.y0) & (x1 <= frame.x1) & (y1 <= frame.y1)
        t = np.array(taken)
        hits = ((x0[:, None] < t[None, :, 2]) & (x1[:, None] > t[None, :, 0])
                & (y0[:, None] < t[None, :, 3]) & (y1[:, None] > t[None, :, 1])).any(1)
        crosses = ((x0[:, None] < samples[None, :, 0]) & (x1[:, None] > samples[None, :, 0])
                   & (y0[:, None] < samples[None, :, 1]) & (y1[:, None] > samples[None, :, 1])).any(1)
        cost = distance + LINE_PENALTY * crosses + np.where(hits, 1e6, 0.0) + np.where(inside, 0.0, 1e9)
        k = int(cost.argmin())
        dx, dy = offsets[k]
        far = distance[k] > LABEL_RADII[1]
        made.append(ax.annotate(
            text, (x, y), xytext=(float(dx), float(dy)), textcoords="offset points", fontsize=fontsize,
            ha=("left", "center", "right")[int(ha[k] * 2)], va=("bottom", "center", "top")[int(va[k] * 2)],
            arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5", shrinkA=0, shrinkB=2) if far else None,
        ))
        taken.append((x0[k], y0[k], x1[k], y1[k]))
    return made


def line_samples(xy, step: float = 4.0):
    """Points every `step` pixels along a polyline given in display pixels."""
    for (x0, y0), (x1, y1) in zip(xy[:-1], xy[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        for k in range(n + 1):
            yield x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n


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


def main(argv=None) -> int:
    """`python -m zipkv.eval.plots OUT [--only overview]`: redraw the PNGs of a finished run from
    OUT/results.jsonl (its latest row per case), without a model."""
    import argparse

    from .results import ResultStore

    parser = argparse.ArgumentParser(prog="python -m zipkv.eval.plots", description=main.__doc__)
    parser.add_argument("out", type=Path, help="a zipkv eval output folder (holds results.jsonl)")
    parser.add_argument("--only", choices=("overview", "score_vs_ratio", "heatmaps"), help="redraw one kind only")
    args = parser.parse_args(argv)
    rows = ResultStore(args.out).latest()
    if not rows:
        parser.error(f"out: no results in {args.out / 'results.jsonl'}")
    drawers = {"overview": lambda: [overview(rows, args.out / "overview.png")],
               "score_vs_ratio": lambda: [score_vs_ratio(rows, args.out / "score_vs_ratio.png")],
               "heatmaps": lambda: depth_heatmaps(rows, args.out)}
    made = drawers[args.only]() if args.only else plot_all(rows, args.out)
    print("wrote " + ", ".join(str(p) for p in made if p is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
