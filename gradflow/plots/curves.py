"""Line figures: learning curves per epoch and statistics against depth."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradflow.errors import GradflowError, unknown_name
from gradflow.plots.binning import load, window_rows
from gradflow.plots.catalog import FIGURES, PlotWarning
from gradflow.plots.selection import TimeWindow, select_layers
from gradflow.plots.style import mark_layer_groups, run_colours, run_labels, stat_label, styled
from gradflow.runfile import Run

if TYPE_CHECKING:
    import pandas as pd

LOSSES = ("train_loss", "val_loss")
LINESTYLES = {"train_loss": "-", "val_loss": "--"}
# Beyond this magnitude matplotlib's axis arithmetic (ranges, margins, ticks) overflows
# float64 and fails; a stored metric may hold any float64.
DRAWABLE = 1e300


def epoch_metric(run: Run, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Epoch numbers and the per-epoch metric ``name`` of ``run``."""
    if run.n_epochs == 0:
        raise GradflowError(
            f"run {run.path.name} has no closed epochs, so no per-epoch {name} to draw"
        )
    metrics = run.metrics
    if name not in metrics:
        raise unknown_name(f"per-epoch metric in {run.path.name}", name, metrics)
    return run.epochs, metrics[name]


def seed_groups(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """Runs grouped by their config without ``seed`` and ``command`` (repeats of one
    experiment over seeds), in first-seen order, each with a label: the model name, plus
    the first run's file stem where two groups share a model name."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        rest = {k: v for k, v in run.config.items() if k not in ("seed", "command")}
        groups.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(run)
    return list(zip(run_labels([g[0] for g in groups.values()]), groups.values(), strict=True))


def _drawable(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` with those beyond +-:data:`DRAWABLE` left out (NaN), and a
    :class:`PlotWarning` saying how many where there are any."""
    far = np.abs(np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=np.inf)) > DRAWABLE
    if not far.any():
        return values
    warnings.warn(
        f"{what}: {int(far.sum())} values beyond ±{DRAWABLE:g} are not drawn",
        PlotWarning,
        stacklevel=2,
    )
    return np.where(far, np.nan, values)


def _min_max(values: pd.Series) -> tuple[float, float]:
    return float(values.min()), float(values.max())


@FIGURES.register("learning-curves")
@styled
def learning_curves(
    runs: Sequence[Run],
    *,
    stat: str | None = None,
    log: bool = False,
    window: TimeWindow | None = None,
    title: str | None = None,
) -> Figure:
    """Training (solid) and validation (dashed) loss per epoch, one colour per experiment.

    Runs that differ only in their seed (:func:`seed_groups`) are drawn as their mean per
    epoch with a band from the minimum to the maximum over the runs (``seaborn.lineplot``).
    ``stat`` names another stored per-epoch metric to draw instead (``v_rand``, ...).
    """
    import pandas as pd
    import seaborn as sns

    if window is not None and window.unit != "epoch":
        raise GradflowError("learning-curves are per epoch; select them with --epochs")
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    groups = seed_groups(runs)
    for (label, group), colour in zip(groups, run_colours(len(groups)), strict=True):
        # With neither loss stored, asking for train_loss yields the error listing what is.
        names = [stat] if stat else [m for m in LOSSES if m in group[0].metrics] or [LOSSES[0]]
        for name in names:
            frames = []
            for run in group:
                epochs, values = epoch_metric(run, name)
                values = _drawable(values, f"{run.path.name}, {name}")
                a, b = window_rows(epochs, window)
                frames.append(pd.DataFrame({"epoch": epochs[a:b], name: values[a:b]}))
            data = pd.concat(frames, ignore_index=True)
            spread = f" (mean, min–max of {len(group)} runs)" if len(group) > 1 else ""
            sns.lineplot(
                data=data,
                x="epoch",
                y=name,
                estimator="mean",
                errorbar=_min_max if len(group) > 1 else None,
                color=colour,
                linestyle=LINESTYLES.get(name, "-"),
                marker="." if data["epoch"].nunique() < 30 else None,
                markeredgecolor=colour,
                label=f"{label}, {name}{spread}",
                ax=ax,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel(stat or "loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("log")
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def _span_label(unit: str, first: int, last: int) -> str:
    return f"{unit} {first}" if first == last else f"{unit}s {first}–{last}"


@FIGURES.register("depth-profile")
@styled
def depth_profile(
    runs: Sequence[Run],
    *,
    stat: str = "epoch/update_abs_mean",
    log: bool = False,
    window: TimeWindow | None = None,
    layers: str | None = None,
    all_layers: bool = False,
    title: str | None = None,
    profiles: int = 4,
) -> Figure:
    """A statistic against depth (input left) at a few epochs or steps, runs overlaid.

    The window is cut into ``profiles`` equal parts; each line is the mean over one part
    (darker = later). Runs of different depth share a relative depth axis.
    """
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    data = [
        load(run, stat, select_layers(run, layers, all_layers), window, max_bins=profiles)
        for run in runs
    ]
    depths = {len(d.layers) for d in data}
    relative = len(depths) > 1
    for d, label, colour in zip(data, run_labels(runs), run_colours(len(runs)), strict=True):
        n = len(d.layers)
        x = (np.arange(n) + 0.5) / (n if relative else 1)
        for i, (first, last) in enumerate(d.spans):
            ax.plot(
                x,
                d.values[i],
                color=colour,
                alpha=0.3 + 0.7 * (i + 1) / len(d.spans),
                label=f"{label}, {_span_label(d.unit, int(first), int(last))}",
            )
    first = data[0]
    mark_layer_groups(ax, first.layers, "x", scale=1 / len(first.layers) if relative else 1.0)
    ax.set_xlabel("relative depth (input → output)" if relative else "layer (input → output)")
    ax.set_ylabel(stat_label(stat))
    if log:
        ax.set_yscale("log")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title)
    return fig
