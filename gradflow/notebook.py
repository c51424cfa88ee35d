"""Runs in Jupyter: a run's own HTML view and interactive heat maps of one or more runs.

``Run._repr_html_`` (what a notebook shows for a run) is :func:`run_html`: the summary that
``gradflow info`` prints next to a small heat map of the epoch updates, or of the gradient
norms where no epoch was closed, as an inline PNG. :func:`show` returns a plotly figure
that displays itself inline, with hover; it draws like the browser report.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

from gradflow.errors import GradflowError
from gradflow.escape import visible
from gradflow.runfile import Run, open_run

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

RunLike = Run | str | os.PathLike[str]
SUMMARY_WIDTH = 96
THUMBNAIL_INCHES = (4.2, 3.6)
THUMBNAIL_DPI = 80
REPORT_BINS = 500  # as the browser report: about a panel's width in pixels


def summary_html(run: Run) -> str:
    """What ``gradflow info`` prints for ``run``, as an HTML ``<pre>`` (text escaped)."""
    from rich.console import Console

    from gradflow.plots.info import info_panel

    console = Console(
        record=True,
        width=SUMMARY_WIDTH,
        file=io.StringIO(),
        color_system=None,
        force_jupyter=False,  # in a notebook rich would also display it itself
    )
    console.print(info_panel(run))
    text = "\n".join(line.rstrip() for line in console.export_text().splitlines())
    return (
        f'<pre style="font-size:12px;line-height:1.25;margin:0">{html.escape(visible(text))}</pre>'
    )


def thumbnail_png(run: Run) -> tuple[bytes, str]:
    """A small PNG of the run's default view (:func:`~gradflow.plots.default.default_view`)
    and what it shows."""
    from gradflow.plots import render
    from gradflow.plots.default import default_view

    view = default_view([run])
    fig = render(view.figure, [run], stat=view.stat, log=view.log, title=view.stat)
    fig.set_size_inches(*THUMBNAIL_INCHES)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=THUMBNAIL_DPI)
    return buffer.getvalue(), view.describe()


def run_html(run: Run) -> str:
    """The notebook view of ``run``: its summary beside a heat map (a message where the run
    holds nothing to draw yet). Never raises for a readable run.

    Args:
        run: an open run.

    Returns:
        An HTML fragment; every text from the file is escaped.
    """
    try:
        png, caption = thumbnail_png(run)
        figure = (
            f'<img alt="{html.escape(caption)}" title="{html.escape(caption)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        )
    except GradflowError as err:
        figure = f"<p><i>no heat map: {html.escape(str(err))}</i></p>"
    return (
        '<div class="gradflow-run" style="display:flex;gap:16px;align-items:flex-start;'
        f'flex-wrap:wrap">{summary_html(run)}<div>{figure}</div></div>'
    )


def show(
    runs: RunLike | Sequence[RunLike],
    stat: str | None = None,
    *,
    log: bool | None = None,
    layers: str | None = None,
    all_layers: bool = False,
    max_bins: int = REPORT_BINS,
) -> Figure:
    """An interactive heat map of ``stat`` per layer and step or epoch, one panel per run,
    with one colour scale; in a notebook it displays inline.

    Args:
        runs: a run or a run file's path, or a sequence of them.
        stat: ``probe/name`` (e.g. ``param/update_ratio``, ``epoch/update_norm``); default:
            the per-epoch updates where every run closed an epoch, else gradient norms.
        log: log colour (default: where the statistic has positive values, but fractions).
        layers: a glob or regular expression of layer names to draw.
        all_layers: draw every layer (default: conv layers of zoo FCNs, else weight layers).
        max_bins: the most time columns; longer runs are averaged into bins.

    Layers never measured in a run are left out of its panel; the title says how many.

    Returns:
        A ``plotly.graph_objects.Figure``; hover shows layer, step or epoch and value.
    """
    from gradflow.plots.binning import load
    from gradflow.plots.default import default_view
    from gradflow.plots.interactive import HeatPanel, heatmap_grid
    from gradflow.plots.selection import left_out_note, select_layers
    from gradflow.plots.style import run_labels

    given = [runs] if isinstance(runs, (Run, str, os.PathLike)) else list(runs)
    with ExitStack() as stack:
        opened = [
            run if isinstance(run, Run) else stack.enter_context(open_run(run)) for run in given
        ]
        view = default_view(opened, stat)
        panels, notes = [], [view.stat]
        for run, label in zip(opened, run_labels(opened), strict=True):
            chosen = select_layers(run, layers, all_layers)
            data, left_out = load(run, view.stat, chosen, None, max_bins).measured()
            panels.append(HeatPanel(label, data, run.first_nonfinite))
            if note := left_out_note(left_out):
                notes.append(note if len(opened) == 1 else f"{label}: {note}")
    return heatmap_grid(
        panels,
        view.stat,
        log=view.log if log is None else log,
        columns=len(panels),
        title="; ".join(notes),
    )
