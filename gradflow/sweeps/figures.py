"""The sweep's figures (plotly): heat maps averaged over seeds as small multiples, one per
factor combination, and a scalar per run against a setting with the seeds as a band."""

from __future__ import annotations

import html
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from matplotlib.colors import to_hex

from gradflow.plots.binning import LayerTime
from gradflow.plots.interactive import HeatPanel, heatmap_spec
from gradflow.plots.selection import left_out_note
from gradflow.plots.style import run_colours, stat_label
from gradflow.sweeps.scalars import SCALARS
from gradflow.sweeps.structure import Structure, canonical, level_order
from gradflow.sweeps.summary import RunSummary

MAX_COLUMNS = 4
CELL_HEIGHT = 240
BAND_OPACITY = 0.18


def setting(summary: RunSummary, key: str) -> Any:
    """The value of the dotted config ``key`` in ``summary`` (None where it has none)."""
    return summary.settings.get(key)


def text(value: Any) -> str:
    """A setting's value as a label."""
    return value if isinstance(value, str) else canonical(value)


@dataclass(frozen=True)
class Cell:
    """One combination of the factors' values and the runs (indices) that have it."""

    values: tuple[Any, ...]
    members: list[int]

    @property
    def label(self) -> str:
        return " · ".join(text(v) for v in self.values) or "all runs"


def cells(summaries: Sequence[RunSummary], keys: Sequence[str]) -> list[Cell]:
    """The runs grouped by their values of ``keys``, in the values' sorted order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    values: dict[tuple[str, ...], tuple[Any, ...]] = {}
    for i, summary in enumerate(summaries):
        raw = tuple(setting(summary, key) for key in keys)
        key = tuple(canonical(v) for v in raw)
        groups.setdefault(key, []).append(i)
        values[key] = raw
    order = sorted(groups, key=lambda k: [level_order(v) for v in values[k]])
    return [Cell(values[k], groups[k]) for k in order]


def seed_mean(members: Sequence[LayerTime]) -> tuple[LayerTime, int]:
    """The NaN-ignoring mean of the matrices that share the most common layers and time
    bins (a run still being written has fewer), and how many those are."""

    def shape(d: LayerTime) -> tuple[tuple[str, ...], bytes]:
        return tuple(lay.name for lay in d.layers), d.edges.tobytes()

    common, _ = Counter(shape(d) for d in members).most_common(1)[0]
    same = [d for d in members if shape(d) == common]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a cell no run measured stays NaN
        values = np.nanmean(np.stack([d.values for d in same]), axis=0)
    return replace(same[0], values=values), len(same)


def heatmap_figure(
    summaries: Sequence[RunSummary], structure: Structure, stat: str, log: bool = True
) -> dict[str, Any] | None:
    """Small multiples of ``stat``: per factor combination, its runs' mean heat map, rows
    by the first factor, one colour scale; None where no run holds ``stat``. A panel
    leaves out the layers none of its runs measured (frozen throughout); the title says
    how many.

    Args:
        summaries: the runs' summaries.
        structure: their factors.
        stat: the statistic (``probe/name``).
        log: log colour where the values have positive ones.

    Returns:
        The plotly figure spec (see :func:`~gradflow.plots.interactive.heatmap_spec`), or None.
    """
    panels, left_out = [], []
    for cell in cells(summaries, structure.factors):
        held = [d for i in cell.members if (d := summaries[i].heat.get(stat)) is not None]
        if not held:
            continue
        mean, used = seed_mean(held)
        measured, n = mean.measured()
        runs = (
            f"{used} runs" if used == len(cell.members) else f"{used} of {len(cell.members)} runs"
        )
        panels.append(HeatPanel(f"{cell.label} ({runs})", measured))
        if note := left_out_note(n):
            left_out.append((cell.label, note))
    if not panels:
        return None
    rest = {tuple(canonical(v) for v in c.values[1:]) for c in cells(summaries, structure.factors)}
    columns = min(MAX_COLUMNS, len(rest) if len(structure.factors) > 1 else len(panels))
    notes = [note if len(panels) == 1 else f"{label}: {note}" for label, note in left_out]
    title = "; ".join(
        [f"{stat_label(stat)} ({stat}), mean over the runs of each combination", *notes]
    )
    return heatmap_spec(panels, stat, log=log, columns=columns, title=title, row_height=CELL_HEIGHT)


def _rgba(colour: str, alpha: float) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _x_axis(levels: list[Any]) -> dict[str, Any]:
    numbers = [v for v in levels if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if levels and len(numbers) == len(levels):
        wide = min(numbers) > 0 and max(numbers) / min(numbers) >= 100
        if wide:  # a label per decade, as 1e-4
            return {"type": "log", "dtick": 1, "exponentformat": "e"}
        return {"type": "linear"}
    return {
        "type": "category",
        "categoryorder": "array",
        "categoryarray": [text(v) for v in levels],
    }


def scalar_figure(
    summaries: Sequence[RunSummary], structure: Structure, scalar: str, x: str | None
) -> dict[str, Any]:
    """``scalar`` of every run against setting ``x``: per combination of the other factors a
    line through the mean over its runs (seeds), a band from their minimum to maximum, and
    each run as a point.

    Args:
        summaries: the runs' summaries.
        structure: their factors and seed.
        scalar: a registered scalar (:data:`~gradflow.sweeps.scalars.SCALARS`).
        x: the setting along x (a factor or the seed); None: the runs' files.

    Returns:
        The plotly figure spec (``{"data": [...], "layout": {...}}``).
    """
    info = SCALARS.get(scalar)
    # Lines for the factors x does not follow from: a learning rate set per model and
    # optimizer is drawn as one line over every run.
    given = structure.follows.get(x, []) if x else []
    others = [f for f in structure.factors if f != x and f not in given]
    colours = [to_hex(c) for c in run_colours(10)]

    def x_of(summary: RunSummary) -> Any:
        return x_of_level(setting(summary, x)) if x else summary.path.name

    if x is None:
        levels: list[Any] = [s.path.name for s in summaries]
    else:
        found = {canonical(v): v for v in (setting(s, x) for s in summaries)}
        levels = sorted(found.values(), key=level_order)
    traces: list[dict[str, Any]] = []
    for k, series in enumerate(cells(summaries, others)):
        colour = colours[k % len(colours)]
        name = html.escape(series.label)
        points = [
            (x_of(summaries[i]), summaries[i].scalars.get(scalar, math.nan), i)
            for i in series.members
        ]
        shown = [p for p in points if math.isfinite(p[1])]
        by_x: dict[str, list[float]] = {}
        for px, value, _ in shown:
            by_x.setdefault(canonical(px), []).append(value)
        xs = [v for v in (x_of_level(level) for level in levels) if canonical(v) in by_x]
        ys = [by_x[canonical(v)] for v in xs]
        group = {"legendgroup": name, "name": name}
        if xs:
            traces.append(
                {
                    "type": "scatter",
                    "x": xs + xs[::-1],
                    "y": [max(y) for y in ys] + [min(y) for y in ys[::-1]],
                    "fill": "toself",
                    "mode": "lines",
                    "line": {"width": 0},
                    "fillcolor": _rgba(colour, BAND_OPACITY),
                    "hoverinfo": "skip",
                    "showlegend": False,
                    **group,
                }
            )
            traces.append(
                {
                    "type": "scatter",
                    "x": xs,
                    "y": [float(np.mean(y)) for y in ys],
                    "mode": "lines+markers",
                    "line": {"color": colour},
                    "hovertemplate": f"{name}<br>mean %{{y:.4g}} at %{{x}}<extra></extra>",
                    **group,
                }
            )
        traces.append(
            {
                "type": "scatter",
                "x": [p[0] for p in shown],
                "y": [p[1] for p in shown],
                "mode": "markers",
                "marker": {"color": colour, "size": 6, "opacity": 0.7},
                "showlegend": False,
                "hovertext": [html.escape(_run_hover(summaries[p[2]], structure)) for p in shown],
                "hovertemplate": "%{hovertext}<br>%{y:.4g}<extra></extra>",
                **group,
            }
        )
    layout = {
        "template": "none",
        "title": {"text": html.escape(f"{info.label} by {x or 'run'}"), "x": 0, "xanchor": "left"},
        "xaxis": {"title": {"text": html.escape(x or "run")}, **_x_axis(levels)},
        "yaxis": {"title": {"text": html.escape(info.label)}},
        "height": 420,
        "margin": {"l": 70, "r": 10, "t": 50, "b": 60},
        "legend": {"title": {"text": html.escape(" · ".join(others))}},
    }
    return {"data": traces, "layout": layout}


def x_of_level(level: Any) -> Any:
    """A level of the x setting as plotted: numbers as numbers, anything else as text."""
    return level if isinstance(level, (int, float)) and not isinstance(level, bool) else text(level)


def _run_hover(summary: RunSummary, structure: Structure) -> str:
    seed = f", {structure.seed} {text(setting(summary, structure.seed))}" if structure.seed else ""
    return f"{summary.path.name}{seed}"
