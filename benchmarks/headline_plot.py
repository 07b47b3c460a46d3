"""The headline PNG: one panel per shape, ms per decode step of every row (horizontal bars,
log scale) with its roofline as a black tick and x-roofline in the label."""

from __future__ import annotations

import os

COLORS = {"baseline": "#888888", "zipkv": "#4477aa", "hf": "#cc6677"}


def row_color(row: str) -> str:
    from benchmarks.headline_rows import BASELINE_METHODS, HF_ROWS

    row = row.removesuffix("+compile")  # a --compile run's row (benchmarks/headline.py merge)
    if row in BASELINE_METHODS:
        return COLORS["baseline"]
    return COLORS["hf"] if row in HF_ROWS else COLORS["zipkv"]


def shape_label(batch: int, context: int) -> str:
    return f"{batch} x {context // 1024}K" if context >= 1024 and context % 1024 == 0 else f"{batch} x {context}"


def plot(res: dict, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "ms_per_step" in r]
    shapes = sorted({(r["batch"], r["context"]) for r in rows}, key=lambda s: (s[1], s[0]))
    if not shapes:
        raise ValueError("no row with ms_per_step to plot")
    names = list(dict.fromkeys(r["row"] for r in res["rows"]))  # run order, errors included (empty bars)
    cols = min(3, len(shapes))
    nrows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(7.0, 5.6 * cols), 0.32 * len(names) * nrows + 1.6 * nrows),
                             squeeze=False)
    for ax, (batch, context) in zip(axes.flat, shapes):
        here = {r["row"]: r for r in rows if (r["batch"], r["context"]) == (batch, context)}
        ys = list(range(len(names)))[::-1]
        for y, name in zip(ys, names):
            r = here.get(name)
            if r is None:
                continue
            ax.barh(y, r["ms_per_step"], color=row_color(name), height=0.7)
            label = f"{r['ms_per_step']:.1f}"
            if r.get("roofline_ms"):
                ax.plot([r["roofline_ms"]] * 2, [y - 0.42, y + 0.42], color="black", lw=2)
                label += f" ({r['x_roofline']:.2f}x roof)"
            ax.annotate(label, (r["ms_per_step"], y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=7)
        ax.set_yticks(ys, names, fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("ms per decode step (log; black tick: roofline)", fontsize=8)
        ax.set_title(shape_label(batch, context), fontsize=10)
        top = max(r["ms_per_step"] for r in here.values())
        ax.set_xlim(right=top * 6)
    for ax in list(axes.flat)[len(shapes):]:
        ax.set_visible(False)
    part = res["parts"][0]
    dev = part.get("device", {})
    fig.suptitle(f"decode step, {part.get('model', '')}, {dev.get('gpu', dev.get('device'))}\n"
                 "grey: bf16 / fp8 / int4 on zipkv's graph decoder; blue: zipkv presets; red: transformers caches; "
                 "+compile: each decoder layer compiled",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
