"""The paper's table: best validation loss per run and the training loss at that epoch."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from gradflow.analysis import centre_edge_ratio
from gradflow.escape import csv_cell, markdown_cell
from gradflow.plots.catalog import FIGURES, TABLES
from gradflow.plots.curves import epoch_metric
from gradflow.plots.style import run_labels, styled
from gradflow.runfile import Run

Cell = str | int | float


@dataclass(frozen=True)
class Table:
    """A small table with a header; numbers keep full precision until formatted."""

    columns: list[str]
    rows: list[list[Cell]]

    def formatted(self) -> list[list[str]]:
        """Cells as text, floats to four significant digits, NaN as ``n/a``."""
        return [[_format(cell) for cell in row] for row in self.rows]

    def to_markdown(self) -> str:
        """A Markdown table; cells escaped (:func:`~gradflow.escape.markdown_cell`)."""
        cells = [[markdown_cell(cell) for cell in row] for row in [self.columns, *self.formatted()]]
        lines = [cells[0], ["---"] * len(self.columns), *cells[1:]]
        return "".join("| " + " | ".join(line) + " |\n" for line in lines)

    def to_csv(self) -> str:
        """CSV with numbers at full precision; text that a spreadsheet would run as a
        formula is quoted (:func:`~gradflow.escape.csv_cell`)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        rows: list[list[Cell]] = [list(self.columns), *self.rows]
        for row in rows:
            writer.writerow([csv_cell(cell) if isinstance(cell, str) else cell for cell in row])
        return out.getvalue()


def _format(cell: Cell) -> str:
    if isinstance(cell, float):
        return "n/a" if math.isnan(cell) else f"{cell:.4g}"
    return str(cell)


@TABLES.register("best-losses")
def best_losses_table(runs: Sequence[Run]) -> Table:
    """Per run: the epoch of the lowest validation loss, that loss and the training loss then."""
    rows: list[list[Cell]] = []
    for run, label in zip(runs, run_labels(runs), strict=True):
        epochs, val = epoch_metric(run, "val_loss")
        train = run.metrics.get("train_loss", np.full(len(val), np.nan))
        if np.isnan(val).all():
            rows.append([label, "n/a", math.nan, math.nan, run.n_epochs])
            continue
        best = int(np.nanargmin(val))
        rows.append([label, int(epochs[best]), float(val[best]), float(train[best]), run.n_epochs])
    columns = ["model", "best epoch", "best val_loss", "train_loss at best", "epochs"]
    return Table(columns, rows)


@TABLES.register("centre-edge")
def centre_edge_table(runs: Sequence[Run]) -> Table:
    """Per model: the centre/edge ratio of per-epoch mean |ΔW| (conv layers), over seeds."""
    groups: dict[str, list[float]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(centre_edge_ratio(run))
    rows: list[list[Cell]] = []
    for name, ratios in groups.items():
        values = np.array(ratios)
        per_run = ", ".join(f"{v:.3g}" for v in values)
        rows.append(
            [
                name,
                len(values),
                float(values.mean()),
                float(values.min()),
                float(values.max()),
                per_run,
            ]
        )
    return Table(["model", "runs", "centre/edge (mean)", "min", "max", "per run"], rows)


def _table_figure(table: Table, title: str | None) -> Figure:
    fig = Figure(figsize=(7.0, 0.8 + 0.3 * len(table.rows)), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    drawn = ax.table(cellText=table.formatted(), colLabels=table.columns, loc="center")
    drawn.auto_set_column_width(list(range(len(table.columns))))
    if title:
        ax.set_title(title)
    return fig


@FIGURES.register("best-losses")
@styled
def best_losses(runs: Sequence[Run], *, title: str | None = None) -> Figure:
    """The best validation loss per run and the training loss at that epoch, as a table."""
    return _table_figure(best_losses_table(runs), title)


@FIGURES.register("centre-edge")
@styled
def centre_edge(runs: Sequence[Run], *, title: str | None = None) -> Figure:
    """Centre/edge ratio of per-epoch mean |ΔW| per model (mean and spread over seeds)."""
    return _table_figure(centre_edge_table(runs), title)
