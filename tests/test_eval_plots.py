"""overview.png's labels (zipkv/eval/plots.py place_labels): none overlaps another label or a
marker, all inside the axes, on a crowded random cluster and on the committed eval results."""

import random
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from zipkv.eval import plots  # noqa: E402
from zipkv.eval.results import ResultStore  # noqa: E402

COMMITTED = Path(__file__).resolve().parent.parent / "results" / "eval-smollm2"


def label_boxes(ax):
    """Display boxes of the text of every annotation (Annotation's own extent adds its leader line)."""
    ax.figure.canvas.draw()  # annotations take their offset positions when drawn
    renderer = ax.figure.canvas.get_renderer()
    return [Text.get_window_extent(note, renderer) for note in ax.texts]


def assert_apart(ax, centers, radius=plots.MARKER_RADIUS_PX):
    boxes = label_boxes(ax)
    frame = ax.get_window_extent(ax.figure.canvas.get_renderer())
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        for other in boxes[i + 1:]:
            assert not box.overlaps(other), (ax.texts[i].get_text(), box, other)
        for cx, cy in centers:
            assert not (box.x0 < cx + radius and box.x1 > cx - radius and box.y0 < cy + radius and box.y1 > cy - radius)


def test_labels_of_a_crowded_cluster_do_not_overlap():
    rng = random.Random(0)
    points = [(4 + rng.uniform(-0.3, 0.3), 0.25 + rng.uniform(-0.04, 0.04), f"method-{i}@0.{i}") for i in range(18)]
    points += [(1, 0.9, "full"), (7, 0.2, "far")]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([1, 7], [0.9, 0.2], "-")  # a line the labels should keep off where they can
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    ax.set_xlim(0, 8)
    ax.set_ylim(0, 1)
    fig.tight_layout()
    notes = plots.place_labels(ax, points, fontsize=6)
    assert sorted(n.get_text() for n in notes) == sorted(p[2] for p in points)
    assert_apart(ax, [tuple(ax.transData.transform(p[:2])) for p in points])
    plt.close(fig)


def test_committed_overview_has_no_overlapping_labels():
    rows = ResultStore(COMMITTED).latest()
    fig = plots.overview_figure(rows)
    for ax in fig.axes:
        centers = [tuple(xy) for c in ax.collections for xy in ax.transData.transform(c.get_offsets())]
        assert len(ax.texts) == len(centers) > 20  # every method setting is labelled
        assert_apart(ax, centers)
    plt.close(fig)
