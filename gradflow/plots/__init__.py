"""Figures from run files: one function per figure, each returning a matplotlib Figure.

Every figure is registered in :data:`FIGURES` by the name the command line uses
(``gradflow plot NAME``); :func:`save` draws one into a file.
"""

from gradflow.plots.catalog import FIGURES, TABLES, PlotWarning
from gradflow.plots.curves import depth_profile, learning_curves
from gradflow.plots.heatmap import (
    activation_heatmap,
    diff_heatmap,
    gradient_heatmap,
    updates_heatmap,
)
from gradflow.plots.output import render, save
from gradflow.plots.selection import TimeWindow
from gradflow.plots.tables import Table, best_losses, best_losses_table

__all__ = [
    "FIGURES",
    "TABLES",
    "PlotWarning",
    "Table",
    "TimeWindow",
    "activation_heatmap",
    "best_losses",
    "best_losses_table",
    "depth_profile",
    "diff_heatmap",
    "gradient_heatmap",
    "learning_curves",
    "render",
    "save",
    "updates_heatmap",
]
