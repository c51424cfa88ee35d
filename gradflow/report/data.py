"""What the report shows, as one JSON-ready dict: facts, health, curves and heat maps of runs.

Heat maps are binned along time to at most :data:`SCREEN_BINS` columns (about a panel's
width in pixels) with :mod:`gradflow.plots.binning`, and shipped as base64 float32, layer
by layer, so that a 1000-layer run stays a few megabytes and the page decodes it at once.
float32 keeps what JSON cannot: NaN (not measured) and +-inf (an infinite value recorded,
e.g. the update ratio of a weight whose norm is 0) arrive in the page as themselves.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console

from gradflow.errors import GradflowError
from gradflow.escape import visible_all
from gradflow.plots.binning import LayerTime, bin_means, bin_starts, common_window, load
from gradflow.plots.heatmap import _listing
from gradflow.plots.info import info_panel
from gradflow.plots.selection import (
    layer_groups,
    left_out_note,
    match_layers,
    measured_columns,
    select_layers,
)
from gradflow.plots.style import (
    BAD_COLOUR,
    DIFF_CMAP,
    FIXED_LIMITS,
    HEAT_CMAP,
    finite_range,
    plotly_colourscale,
    run_labels,
    stat_label,
)
from gradflow.runfile import Layer, Run

SCREEN_BINS = 500
CURVE_POINTS = 2000
SUMMARY_WIDTH = 88  # two runs side by side fit a 1400-pixel window
HEATMAP_STATS = (
    "epoch/update_abs_mean",
    "param/update_ratio",
    "param/grad_norm",
    "grad_output/norm",
    "activation/zero_fraction",
)


def _floats(values: np.ndarray) -> list[float | None]:
    # JSON has no NaN: a missing value is null.
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64)]


def _matrix(values: np.ndarray) -> str:
    """``values[bin, layer]`` as base64 float32, one layer's row of bins after another."""
    return base64.b64encode(np.ascontiguousarray(values.T, dtype="<f4").tobytes()).decode()


def _range(values: Sequence[np.ndarray], positive: bool = False) -> list[float] | None:
    lo, hi = finite_range(values, positive=positive)
    return None if np.isnan(lo) else [lo, hi]


def _has(run: Run, stat: str) -> bool:
    probe, name = stat.split("/", 1)
    if probe == "epoch":
        return name in run.epoch_stats() and run.n_epochs > 0
    return name in run.probes().get(probe, []) and run.n_steps > 0


def _panel(run_index: int, title: str, data: LayerTime, rows: list[int]) -> dict[str, Any]:
    return {
        "run": run_index,
        "title": title,
        "edges": _floats(data.edges),
        "spans": data.spans.astype(np.int64).tolist(),
        "rows": rows,
        "values": _matrix(data.values),
    }


def _events(run: Run) -> list[dict[str, Any]]:
    ev = run.first_nonfinite
    if ev is None:
        return []
    return [{"layer": ev.layer, "step": ev.step, "epoch": ev.epoch, "probe": ev.probe}]


def _summary(run: Run) -> str:
    """What ``gradflow info`` prints for ``run``: facts, overhead and the health table."""
    console = Console(
        record=True,
        width=SUMMARY_WIDTH,
        file=io.StringIO(),
        color_system=None,
        force_jupyter=False,  # a report built in a notebook: rich would display it there
    )
    console.print(info_panel(run))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def _curves(run: Run) -> dict[str, Any]:
    loss: dict[str, Any] = {"x": [], "y": []}
    if run.n_steps:
        steps = run.steps
        starts = bin_starts(steps, CURVE_POINTS)
        means = bin_means([(0, run.loss[:, None])], starts, 1)[:, 0]
        loss = {"x": steps[starts].tolist(), "y": _floats(means)}
    epochs = run.epochs.tolist()
    return {
        "loss": loss,
        "metrics": {k: {"x": epochs, "y": _floats(v)} for k, v in run.metrics.items()},
    }


def _run(run: Run, label: str, shown: list[Layer], not_measured: int) -> dict[str, Any]:
    found = layer_groups(shown)
    stage_of = np.zeros(len(shown), np.int64)
    for i, s in enumerate(found):
        stage_of[s.start : s.stop] = i
    return {
        "label": label,
        "file": run.path.name,
        "steps": run.n_steps,
        "epochs": run.n_epochs,
        "summary": _summary(run),
        "config": [
            [k, v if isinstance(v, str) else json.dumps(v, default=str)]
            for k, v in run.config.items()
        ],
        "layers": [
            {"name": lay.name, "kind": lay.kind, "depth": lay.depth, "aliases": list(lay.aliases)}
            for lay in shown
        ],
        "not_measured": not_measured,
        "stage_of": stage_of.tolist(),
        "stages": [{"name": s.name, "bottleneck": s.bottleneck} for s in found],
        "events": _events(run),
        "curves": _curves(run),
    }


def _diff(
    runs: Sequence[Run],
    labels: list[str],
    stat: str,
    drawn: list[list[Layer]],
    shown: list[Layer],
    max_bins: int,
    ratio: bool,
) -> dict[str, Any]:
    """Run A minus run B (and, with ``ratio``, log10 A/B) over the layers both have, as
    ``diff-heatmap``; ``shown``: run A's layers in the report, which the rows index."""
    matched = match_layers(drawn[0], drawn[1])
    only = [
        f"only in {label} ({len(names)}): {_listing(names)}"
        for label, names in zip(labels, (matched.only_a, matched.only_b), strict=True)
        if names
    ]
    title = f"{labels[0]} − {labels[1]}"
    if not matched.a:
        return {"title": title, "note": "the two runs share no layer name"}
    window = common_window(runs, stat, None)
    a = load(runs[0], stat, matched.a, window, max_bins)
    b = load(runs[1], stat, matched.b, window, max_bins)
    if not np.array_equal(a.edges, b.edges):
        return {"title": title, "note": f"the runs recorded different {window.unit}s"}
    with np.errstate(invalid="ignore"):
        diff = a.values - b.values  # inf - inf: NaN, no difference to show
    keep = measured_columns(diff)
    position = {lay.name: i for i, lay in enumerate(shown)}
    panel = _panel(0, title, a, [position[matched.a[k].name] for k in keep])
    del panel["values"]
    diff = diff[:, keep]
    panel.update(diff=_matrix(diff), diff_range=_range([np.abs(diff)]))
    if ratio:
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.log10(a.values[:, keep] / b.values[:, keep])
        panel.update(ratio=_matrix(log_ratio), ratio_range=_range([np.abs(log_ratio)]))
    left_out = left_out_note(len(matched.a) - len(keep))
    notes = ["layers " + "; ".join(only) if only else None, left_out]
    return {**panel, "note": "; ".join(n for n in notes if n)}


def _heatmap(
    runs: Sequence[Run],
    labels: list[str],
    stat: str,
    data: dict[int, LayerTime],
    layers: tuple[list[list[Layer]], list[list[Layer]]],
    max_bins: int,
) -> dict[str, Any]:
    """The section of ``stat``: ``data`` (its measured layers) per run that holds it;
    ``layers``: every run's drawn layers and those the report shows."""
    drawn, shown = layers
    position = [{lay.name: k for k, lay in enumerate(layers)} for layers in shown]
    panels, left_out = {}, []
    for i, d in data.items():
        panels[i] = d.take([k for k, lay in enumerate(d.layers) if lay.name in position[i]])
        if note := left_out_note(len(drawn[i]) - len(panels[i].layers)):
            left_out.append(note if len(runs) == 1 else f"{labels[i]}: {note}")
    values = [d.values for d in panels.values()]
    fixed = FIXED_LIMITS.get(stat)
    section: dict[str, Any] = {
        "stat": stat,
        "label": stat_label(stat),
        "unit": next(iter(data.values())).unit,
        "log": fixed is None,
        "range": list(fixed) if fixed else _range(values),
        "log_range": _range(values, positive=True),
        "infinite": any(bool(np.isinf(v).any()) for v in values),
        "left_out": "; ".join(left_out),
        "panels": [
            _panel(i, labels[i], d, [position[i][lay.name] for lay in d.layers])
            for i, d in panels.items()
        ],
    }
    if len(runs) == 2 and len(data) == 2:
        section["diff"] = _diff(runs, labels, stat, drawn, shown[0], max_bins, fixed is None)
    return section


def payload(runs: Sequence[Run], max_bins: int = SCREEN_BINS) -> dict[str, Any]:
    """Everything the report page draws for ``runs``, JSON-serialisable (no NaN), every
    string in it :func:`~gradflow.escape.visible` (file names and config values come from
    anyone).

    Layers never measured in any heat map's statistic are left out of the report (each
    run's ``not_measured`` counts them), and each heat map leaves out those never measured
    in its statistic (its ``left_out`` line says how many).
    """
    if not runs:
        raise GradflowError("no run files to report on")
    labels = run_labels(runs)
    drawn = [select_layers(run, all_layers=True) for run in runs]
    loaded = {
        stat: {
            i: load(run, stat, drawn[i], None, max_bins).measured()[0]
            for i, run in enumerate(runs)
            if _has(run, stat)
        }
        for stat in HEATMAP_STATS
    }
    loaded = {stat: data for stat, data in loaded.items() if data}
    shown = []
    for i, layers in enumerate(drawn):
        # A statistic measured nowhere (updates without an optimizer) keeps every layer.
        measured = {
            lay.name
            for data in loaded.values()
            if i in data and not np.isnan(data[i].values).all()
            for lay in data[i].layers
        }
        shown.append([lay for lay in layers if lay.name in measured] or layers)
    data = {
        "colourscales": {
            "heat": plotly_colourscale(HEAT_CMAP),
            "diff": plotly_colourscale(DIFF_CMAP),
        },
        "no_value": BAD_COLOUR,
        "runs": [
            _run(run, label, layers, len(all_drawn) - len(layers))
            for run, label, layers, all_drawn in zip(runs, labels, shown, drawn, strict=True)
        ],
        "heatmaps": [
            _heatmap(runs, labels, stat, sections, (drawn, shown), max_bins)
            for stat, sections in loaded.items()
        ],
    }
    return dict(visible_all(data))


def to_json(data: dict[str, Any]) -> str:
    """``data`` as compact JSON, safe inside an HTML ``<script>`` element."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
