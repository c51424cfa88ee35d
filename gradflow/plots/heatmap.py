"""Layer x time heat maps: one drawing core behind every heat-map figure."""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import CenteredNorm, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.textpath import text_to_path
from matplotlib.ticker import MaxNLocator

from gradflow.errors import GradflowError
from gradflow.plots.binning import MAX_TIME_BINS, LayerTime, common_window, load
from gradflow.plots.catalog import FIGURES, PlotWarning
from gradflow.plots.selection import TimeWindow, left_out_note, match_layers, select_layers
from gradflow.plots.style import (
    DIFF_CMAP,
    FIXED_LIMITS,
    HEAT_CMAP,
    MARKER_COLOUR,
    colormap,
    finite_range,
    mark_layer_groups,
    panel_grid,
    panel_title,
    run_labels,
    short_labels,
    stat_label,
    styled,
    wrap_chars,
)
from gradflow.runfile import Event, Run

Scale = Literal["linear", "log", "diverging"]
LABEL_ROOM = 1.0  # inches of layer labels a panel holds without widening the figure
Extend = Literal["neither", "min", "max", "both"]


class ZeroAwareLogNorm(LogNorm):
    """A LogNorm that draws zeros (and negatives) in the colour map's "under" colour, as
    the smallest values, instead of as missing data: a zero update is a tiny update."""

    def __call__(self, value: Any, clip: bool | None = None) -> Any:
        out = super().__call__(value, clip)
        data = np.ma.getdata(value)
        below = np.isfinite(data) & (data <= 0)
        if np.any(below):
            out = np.ma.array(out, copy=True)
            out[below] = -1.0
        return out


@dataclass
class Panel:
    """One heat map: its title, its data and the events to mark (with a label prefix)."""

    title: str
    data: LayerTime
    events: list[tuple[str, Event]] = field(default_factory=list)


def make_norm(scale: Scale, stat: str, values: Sequence[np.ndarray]) -> Normalize:
    """The colour normalisation over the finite values of ``values``."""
    if scale == "log":
        lo, hi = finite_range(values, positive=True)
        if np.isnan(lo):
            raise GradflowError(f"{stat} has no positive values to draw on a log scale; drop --log")
        return ZeroAwareLogNorm(lo, hi)
    lo, hi = finite_range(values)
    if np.isnan(lo):
        lo, hi = 0.0, 1.0
    if scale == "diverging":
        return CenteredNorm(0.0, max(abs(lo), abs(hi)) or 1.0)
    return Normalize(*FIXED_LIMITS.get(stat, (lo, hi)))


def _extend(norm: Normalize, values: Sequence[np.ndarray]) -> Extend:
    below = any(np.any(v < norm.vmin) for v in values)
    above = any(np.any(v > norm.vmax) for v in values)
    return "both" if below and above else "min" if below else "max" if above else "neither"


def _draw(ax: Axes, data: LayerTime, norm: Normalize, cmap_name: str) -> ScalarMappable:
    n = len(data.layers)
    # A mesh on the bins' edges: irregularly spaced steps are drawn where they are.
    image = ax.pcolormesh(
        data.edges, np.arange(n + 1), data.values.T, cmap=colormap(cmap_name), norm=norm,
        shading="flat", rasterized=True,
    )  # fmt: skip
    mark_layer_groups(ax, data.layers, "y")
    ax.set_xlabel(data.unit)
    ax.set_ylabel("layer (input → output)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return image


def _mark_events(ax: Axes, data: LayerTime, events: list[tuple[str, Event]]) -> None:
    names = [lay.name for lay in data.layers]
    for prefix, ev in events:
        x = ev.epoch if data.unit == "epoch" else ev.step
        label = (
            f"{prefix}first non-finite {ev.probe}: {short_labels([ev.layer])[0]}, "
            f"step {ev.step} (epoch {ev.epoch})"
        )
        if ev.layer in names:
            ax.plot(
                [x],
                [names.index(ev.layer) + 0.5],
                ls="none",
                marker="X",
                ms=9,
                mfc=MARKER_COLOUR,
                mec="k",
                label=label,
            )
        else:  # the layer is not drawn: mark the time only
            ax.axvline(x, color=MARKER_COLOUR, ls="--", lw=1.2, label=label)


def _measured_panels(panels: Sequence[Panel]) -> tuple[list[Panel], str | None]:
    """The panels without their layers never measured, and the line saying so."""
    kept, notes = [], []
    for panel in panels:
        data, n = panel.data.measured()
        kept.append(replace(panel, data=data))
        note = left_out_note(n)
        if note:
            notes.append(note if len(panels) == 1 else f"{panel.title}: {note}")
    return kept, "; ".join(notes) or None


def draw_heatmaps(
    panels: Sequence[Panel],
    *,
    scale: Scale,
    shared_scale: bool,
    colour_label: str,
    title: str | None = None,
    note: str | None = None,
) -> Figure:
    """Draw ``panels`` side by side, layers top (input) to bottom, time left to right.

    Layers never measured in a panel's range are not drawn; the note under the figure
    says how many (:func:`~gradflow.plots.selection.measured_columns`).
    """
    panels, left_out = _measured_panels(panels)
    note = "; ".join(n for n in (note, left_out) if n) or None
    fig, axes = panel_grid(len(panels), (3.4, 5.0))
    cmap = DIFF_CMAP if scale == "diverging" else HEAT_CMAP
    stat = panels[0].data.stat
    every = [p.data.values for p in panels]
    shared = make_norm(scale, stat, every) if shared_scale else None
    for i, (ax, panel) in enumerate(zip(axes, panels, strict=True)):
        norm = shared if shared is not None else make_norm(scale, stat, [panel.data.values])
        image = _draw(ax, panel.data, norm, cmap)
        _mark_events(ax, panel.data, panel.events)
        ax.set_xlim(panel.data.edges[0], panel.data.edges[-1])
        ax.set_ylim(len(panel.data.layers), 0)  # input at the top
        if len(panels) > 1:
            panel_title(ax, i, panel.title)
        else:
            ax.set_title(panel.title)
        if shared is None:
            fig.colorbar(
                image, ax=ax, label=colour_label, extend=_extend(norm, [panel.data.values])
            )
    if shared is not None:
        fig.colorbar(image, ax=axes, label=colour_label, extend=_extend(shared, every))
    _widen_for_labels(fig, axes)
    handles = [h for ax in axes for h in ax.get_legend_handles_labels()[0]]
    if handles or note:
        # One figure-level legend holds the event markers and the note, so that the
        # constrained layout makes room for both below the panels; both wrapped to its width.
        chars = wrap_chars(fig, "small")
        # Beside its marker a label has the width of about 8 characters less.
        label_chars = wrap_chars(fig, mpl.rcParams["legend.fontsize"]) - 8
        for handle in handles:
            handle.set_label(textwrap.fill(str(handle.get_label()), label_chars))
        fig.legend(
            handles=handles,
            title=textwrap.fill(note, chars) if note else None,
            loc="outside lower left",
            frameon=False,
            alignment="left",
            title_fontsize="small",
        )
    if title:
        fig.suptitle(title)
    return fig


def _widen_for_labels(fig: Figure, axes: Sequence[Axes]) -> None:
    """Widen ``fig`` by what its widest layer labels need beyond :data:`LABEL_ROOM` inches,
    in every column of panels, so that the panels keep their width."""
    widths = [
        text_to_path.get_text_width_height_descent(
            label.get_text(), label.get_fontproperties(), ismath=False
        )[0]
        / 72
        for ax in axes
        for label in ax.get_yticklabels()
    ]
    extra = max(widths, default=0.0) - LABEL_ROOM
    if extra > 0:
        columns = len({spec.colspan.start for ax in axes if (spec := ax.get_subplotspec())})
        fig.set_figwidth(fig.get_figwidth() + extra * columns)


def _update_stat(window: TimeWindow | None) -> str:
    return "param/update_abs_mean" if window and window.unit == "step" else "epoch/update_abs_mean"


def _stat_heatmap(
    name: str, default_stat: Callable[[TimeWindow | None], str], doc: str
) -> Callable[..., Figure]:
    """Register figure ``name``: a per-layer statistic over time, one panel per run."""

    @FIGURES.register(name)
    @styled
    def figure(
        runs: Sequence[Run],
        *,
        stat: str | None = None,
        log: bool = False,
        window: TimeWindow | None = None,
        layers: str | None = None,
        all_layers: bool = False,
        shared_scale: bool = True,
        title: str | None = None,
        max_bins: int = MAX_TIME_BINS,
    ) -> Figure:
        stat = stat or default_stat(window)
        panels = [
            Panel(
                label,
                load(run, stat, select_layers(run, layers, all_layers), window, max_bins),
                [("", ev)] if (ev := run.first_nonfinite) else [],
            )
            for run, label in zip(runs, run_labels(runs), strict=True)
        ]
        return draw_heatmaps(
            panels,
            scale="log" if log else "linear",
            shared_scale=shared_scale,
            colour_label=stat_label(stat),
            title=title,
        )

    figure.__doc__ = doc
    figure.__name__ = figure.__qualname__ = name.replace("-", "_")
    return figure


gradient_heatmap = _stat_heatmap(
    "gradient-heatmap",
    lambda window: "grad_output/norm",
    """Any per-layer statistic over time (default: the gradient norm at each layer's output).

    One panel per run; ``window`` in epochs averages per-step statistics per epoch.
    """,
)
updates_heatmap = _stat_heatmap(
    "updates-heatmap",
    _update_stat,
    """Weight updates per layer and epoch, one panel per run (the paper's update figure).

    Default statistic: ``epoch/update_abs_mean`` (mean |W_end - W_start| of each epoch);
    ``param/update_abs_mean`` when ``window`` is in steps.
    """,
)
activation_heatmap = _stat_heatmap(
    "activation-heatmap",
    lambda window: "activation/zero_fraction",
    "Activation statistics over time (default: the fraction of zeros, for dead units).",
)


def _listing(names: list[str], limit: int = 6) -> str:
    more = f", ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@FIGURES.register("diff-heatmap")
@styled
def diff_heatmap(
    runs: Sequence[Run],
    *,
    stat: str | None = None,
    log: bool = False,
    window: TimeWindow | None = None,
    layers: str | None = None,
    all_layers: bool = False,
    title: str | None = None,
    max_bins: int = MAX_TIME_BINS,
) -> Figure:
    """Run A minus run B (log: log10 A/B) per layer and time, layers matched by name.

    Layers present in only one run are left out, listed under the figure and warned about
    (:class:`PlotWarning`). Default statistic as for ``updates-heatmap``.
    """
    if len(runs) != 2:
        raise GradflowError(f"diff-heatmap compares exactly two runs (A B), got {len(runs)}")
    stat = stat or _update_stat(window)
    window = common_window(runs, stat, window)
    label_a, label_b = run_labels(runs)
    matched = match_layers(*(select_layers(run, layers, all_layers) for run in runs))
    only_a, only_b = matched.only_a, matched.only_b
    if not matched.a:
        raise GradflowError(f"{label_a} and {label_b} share no layer name; nothing to compare")
    a = load(runs[0], stat, matched.a, window, max_bins)
    b = load(runs[1], stat, matched.b, window, max_bins)
    if not np.array_equal(a.edges, b.edges):
        raise GradflowError(
            f"{label_a} and {label_b} recorded different {window.unit}s in "
            f"{window.describe()}; a difference needs the same time points"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log10(a.values / b.values) if log else a.values - b.values
    only = [
        f"only in {label} ({len(names)}): {_listing(names)}"
        for label, names in ((label_a, only_a), (label_b, only_b))
        if names
    ]
    note = "layers " + "; ".join(only) if only else None
    if note:
        warnings.warn(f"diff-heatmap: {note}", PlotWarning, stacklevel=2)
    events = [
        (f"{label}: ", ev)
        for label, run in ((label_a, runs[0]), (label_b, runs[1]))
        if (ev := run.first_nonfinite)
    ]
    what = stat_label(stat)
    return draw_heatmaps(
        [Panel(f"{label_a} − {label_b}", replace(a, values=values), events)],
        scale="diverging",
        shared_scale=True,
        colour_label=f"log10 A / B: {what}" if log else f"A − B: {what}",
        title=title,
        note=note,
    )
