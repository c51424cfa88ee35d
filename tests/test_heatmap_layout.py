"""Heat maps stay legible at any layer-name length: no two texts of a drawn figure overlap
and every text lies inside the figure, measured on the Agg canvas."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from runfiles import SyntheticRun

from gradflow.plots import TimeWindow, diff_heatmap, gradient_heatmap, updates_heatmap
from gradflow.plots.style import short_labels
from gradflow.runfile import Layer, open_run

# MONAI UNet-like names, 60 characters each.
LONG = "model.1.submodule.{}.submodule.1.submodule.{}.conv.unit{}.conv"


def layers(n: int, width: int) -> list[Layer]:
    names = [(LONG.format(i // 10, i % 10, i % 2)).ljust(width, "x")[:width] for i in range(n)]
    names = [f"{name[: width - 4]}.{i:03d}" for i, name in enumerate(names)]
    assert len(set(names)) == n and {len(name) for name in names} == {width}
    return [
        Layer(
            index=i,
            name=name,
            kind="conv",
            type="Conv2d",
            depth=i,
            n_params=288,
            shape="(32, 32, 3, 3)",
        )
        for i, name in enumerate(names)
    ]


def write(path: Path, n: int, width: int, seed: int = 0) -> Path:
    with SyntheticRun(path, layers(n, width), model=f"unet-{seed}", seed=seed) as run:
        for _ in range(3):
            run.steps(10).epoch()
        run.nonfinite(17, run.layers[n // 2].name)
    return path


def texts(fig: Figure) -> list[Text]:
    """Every drawn, non-empty text: tick labels in view, axis labels, titles, colour-bar
    labels, the legend's texts and title, the figure's texts."""
    found: list[Text] = list(fig.texts)
    if fig._suptitle is not None:
        found.append(fig._suptitle)
    for ax in fig.axes:
        found += [ax.title, ax._left_title, ax._right_title]
        for axis in (ax.xaxis, ax.yaxis):
            found.append(axis.label)
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    found.append(tick.label1)
    for legend in fig.legends:
        found += [legend.get_title(), *legend.get_texts()]
    unique = {id(t): t for t in found}  # the suptitle is one of the figure's texts
    return [t for t in unique.values() if t.get_visible() and t.get_text().strip()]


def check_layout(fig: Figure) -> int:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [(t, t.get_window_extent(renderer)) for t in texts(fig)]
    frame = Bbox.from_bounds(0, 0, *canvas.get_width_height())
    for text, box in boxes:
        assert frame.x0 - 0.5 <= box.x0 and box.x1 <= frame.x1 + 0.5, text.get_text()
        assert frame.y0 - 0.5 <= box.y0 and box.y1 <= frame.y1 + 0.5, text.get_text()
    for (ta, a), (tb, b) in combinations(boxes, 2):
        overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
        overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
        assert overlap_x <= 0.5 or overlap_y <= 0.5, (ta.get_text(), tb.get_text())
    return len(boxes)


@pytest.mark.parametrize("n_layers", [8, 40])
@pytest.mark.parametrize("width", [12, 60, 120])
def test_heat_maps_texts_never_overlap(tmp_path: Path, n_layers: int, width: int) -> None:
    a = write(tmp_path / "a.h5", n_layers, width)
    b = write(tmp_path / "b.h5", n_layers, width, seed=1)
    with open_run(a) as run_a, open_run(b) as run_b:
        figures = [
            gradient_heatmap([run_a], stat="param/grad_norm", log=True, title="gradient norms"),
            updates_heatmap([run_a, run_b], log=True),
            diff_heatmap([run_a, run_b], stat="param/grad_norm", window=TimeWindow("step")),
        ]
    for fig in figures:
        # At least the layer labels, an x tick, the axis labels and the colour bar's.
        assert check_layout(fig) >= 8


def test_short_labels_keep_both_ends_and_stay_unique() -> None:
    names = [layers(40, 60)[i].name for i in range(40)]
    short = short_labels(names, 28)
    assert len(set(short)) == 40
    for name, label in zip(names, short, strict=True):
        head, _, tail = label.partition("…")
        assert name.startswith(head) and name.endswith(tail) and len(label) <= 28
    assert short_labels(["a.b", "c"], 28) == ["a.b", "c"]  # short names stay as they are
    # Names that differ only in the middle keep more of it, to stay apart.
    twins = ["x" * 20 + "a" + "y" * 20, "x" * 20 + "b" + "y" * 20]
    apart = short_labels(twins, 28)
    assert len(set(apart)) == 2 and all(np.char.count(apart, "…") <= 1)
