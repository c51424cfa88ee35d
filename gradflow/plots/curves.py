"""Line figures: learning curves per epoch and statistics against depth."""

from __future__ import annotations

import json
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradflow.errors import GradflowError, unknown_name
from gradflow.plots.binning import LayerTime, load, window_rows
from gradflow.plots.catalog import FIGURES, PlotWarning
from gradflow.plots.selection import TimeWindow, left_out_note, measured_columns, select_layers
from gradflow.plots.style import (
    mark_layer_groups,
    run_colours,
    run_labels,
    stat_label,
    styled,
    wrap_chars,
)
from gradflow.runfile import Run

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes

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


DEPTH_STATS = ("epoch/update_abs_mean", "grad_output/norm")


def _depth_stats(runs: Sequence[Run], stat: str | None) -> list[str]:
    """The statistics ``stat`` names (comma-separated), or by default those of
    :data:`DEPTH_STATS` every run stores (at least the first, whose absence is an error)."""
    if stat is not None:
        names = [s.strip() for s in stat.split(",") if s.strip()]
        if not names:
            raise GradflowError(f"--stat {stat!r} names no statistic")
        return names

    def stored(run: Run, spec: str) -> bool:
        probe, name = spec.split("/", 1)
        names = run.epoch_stats() if probe == "epoch" else run.probes().get(probe, [])
        return name in names

    return [DEPTH_STATS[0]] + [s for s in DEPTH_STATS[1:] if all(stored(r, s) for r in runs)]


@FIGURES.register("depth-profile")
@styled
def depth_profile(
    runs: Sequence[Run],
    *,
    stat: str | None = None,
    log: bool = False,
    window: TimeWindow | None = None,
    layers: str | None = None,
    all_layers: bool = False,
    title: str | None = None,
    profiles: int = 1,
) -> Figure:
    """Statistics against depth (input left), one line per experiment, a band over seeds.

    One panel per statistic: those ``stat`` names (comma-separated), by default the
    per-epoch update ``epoch/update_abs_mean`` and, where every run stores it, the gradient
    at each layer's output ``grad_output/norm``. Each run's values are averaged over the
    window (all epochs, or all steps); ``profiles`` > 1 cuts it into equal parts drawn as
    one line each (darker = later). Runs that differ only in their seed
    (:func:`seed_groups`) are drawn as their mean per layer with a band from the minimum to
    the maximum over the runs (``seaborn.lineplot``, errorbar ``("pi", 100)``). Runs of
    different depth share a relative depth axis; the stage boundaries drawn are those of the
    first experiment. Layers that no run of an experiment measured in the window (frozen
    throughout it) are not drawn; the note under the figure says how many.
    """
    return _depth_figure(
        runs,
        _depth_stats(runs, stat),
        DepthOptions(window, layers, all_layers, profiles, measured_only=True),
        log=log,
        title=title,
    )


@FIGURES.register("shortcut-share")
@styled
def shortcut_share(
    runs: Sequence[Run],
    *,
    window: TimeWindow | None = None,
    title: str | None = None,
) -> Figure:
    """Share of the gradient taking each skip connection against depth (``skip`` probe).

    Top: ``skip/shortcut_share`` at each residual block's first convolution, the share of
    the gradient reaching the block's input through its shortcut; bottom:
    ``skip/long_share`` at each encoder stage's last convolution, the share of the gradient
    reaching the encoder output through its long skip (0.5: both paths carry as much). Each
    run averaged over its recorded steps (or ``window``), runs that differ only in seed as
    their mean with a min–max band, as in :func:`depth_profile`.
    """
    for run in runs:
        if "skip" not in run.probes():
            raise GradflowError(
                f"{run.path.name} has no skip statistics: record it with --probes ...,skip"
            )
    fig = _depth_figure(
        runs,
        ["skip/shortcut_share", "skip/long_share"],
        DepthOptions(window, marker="o"),
        log=False,
        title=title,
    )
    for ax in fig.axes:
        ax.set_ylim(0.0, 1.0)
        ax.axhline(0.5, color="0.5", lw=0.8, ls=":")
    return fig


@dataclass(frozen=True)
class DepthOptions:
    """What the depth figures average and how they draw it; ``measured_only``: leave out
    the layers never measured (not for skip shares, which only some layers have by design:
    their points stay at their layers' depth)."""

    window: TimeWindow | None = None
    layers: str | None = None
    all_layers: bool = False
    profiles: int = 1
    marker: str | None = None
    measured_only: bool = False


def _depth_figure(
    runs: Sequence[Run],
    stats: Sequence[str],
    options: DepthOptions,
    *,
    log: bool,
    title: str | None,
) -> Figure:
    """One panel per statistic of :func:`_depth_panel`, a legend below them all."""
    groups = seed_groups(runs)
    fig = Figure(figsize=(8.5, 0.9 + 2.7 * len(stats)), layout="constrained")
    axes = fig.subplots(len(stats), 1, squeeze=False)[:, 0]
    relative = False
    notes = []
    for ax, name in zip(axes, stats, strict=True):
        relative, left_out = _depth_panel(ax, groups, name, options)
        notes += [note if len(stats) == 1 else f"{name}: {note}" for note in left_out]
        ax.set_ylabel(stat_label(name))
        if log:
            ax.set_yscale("log")
    axes[-1].set_xlabel("relative depth (input → output)" if relative else "layer (input → output)")
    legend: dict[str, Any] = {}
    for ax in axes:  # a group may have no values in some panel (a model without short skips)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    note = "; ".join(notes)
    fig.legend(
        legend.values(),
        legend.keys(),
        loc="outside lower center",
        ncols=min(2, len(legend)),
        title=textwrap.fill(note, wrap_chars(fig, "small")) if note else None,
        title_fontsize="small",
    )
    if title:
        fig.suptitle(title)
    return fig


def _group_data(
    label: str, group: list[Run], stat: str, options: DepthOptions
) -> tuple[list[LayerTime], int]:
    """``stat`` of each run of one group, and how many layers that no run of it measured
    were left out (with ``options.measured_only``)."""
    loaded = [
        load(
            run,
            stat,
            select_layers(run, options.layers, options.all_layers),
            options.window,
            options.profiles,
        )
        for run in group
    ]
    n = len(loaded[0].layers)
    if any(len(d.layers) != n for d in loaded):
        raise GradflowError(f"the runs of {label} differ in their layers: draw them apart")
    if not options.measured_only:
        return loaded, 0
    keep = measured_columns(np.concatenate([d.values for d in loaded]))
    return [d.take(keep) for d in loaded], n - len(keep)


def _depth_panel(
    ax: Axes, groups: list[tuple[str, list[Run]]], stat: str, options: DepthOptions
) -> tuple[bool, list[str]]:
    """Draw ``stat`` against depth per group into ``ax``: True where the groups differ in
    depth and share a relative depth axis, and the notes on layers left out."""
    import pandas as pd
    import seaborn as sns

    data, notes = [], []
    for label, group in groups:
        loaded, left_out = _group_data(label, group, stat, options)
        data.append(loaded)
        if note := left_out_note(left_out):
            notes.append(note if len(groups) == 1 else f"{label}: {note}")
    relative = len({len(d.layers) for group in data for d in group}) > 1
    for (label, group), loaded, colour in zip(groups, data, run_colours(len(groups)), strict=True):
        n = len(loaded[0].layers)
        x = (np.arange(n) + 0.5) / (n if relative else 1)
        spread = f" (mean, min–max of {len(group)} runs)" if len(group) > 1 else ""
        spans = loaded[0].spans
        for i, (first, last) in enumerate(spans):
            y = np.concatenate([d.values[i] for d in loaded])
            if np.isnan(y).all():
                continue
            span = _span_label(loaded[0].unit, int(first), int(last))
            sns.lineplot(
                data=pd.DataFrame({"x": np.tile(x, len(loaded)), "y": y}),
                x="x",
                y="y",
                estimator="mean",
                errorbar=("pi", 100) if len(loaded) > 1 else None,
                color=colour,
                alpha=0.3 + 0.7 * (i + 1) / len(spans),
                marker=options.marker,
                markersize=4,
                markeredgecolor=colour,
                label=f"{label}, {span}{spread}" if len(spans) > 1 else f"{label}{spread}",
                legend=False,
                ax=ax,
            )
    first = data[0][0]
    mark_layer_groups(ax, first.layers, "x", scale=1 / len(first.layers) if relative else 1.0)
    ax.grid(alpha=0.3, axis="y")
    ax.set_xlabel("")
    return relative, notes
