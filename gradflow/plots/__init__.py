"""Figures from run files: one function per figure, each returning a matplotlib Figure.

Every figure is registered in :data:`FIGURES` by the name the command line uses
(``gradflow plot NAME``); :func:`save` draws one into a file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradflow.plots.catalog import FIGURES, TABLES, PlotWarning
    from gradflow.plots.curves import depth_profile, learning_curves, shortcut_share
    from gradflow.plots.heatmap import (
        activation_heatmap,
        diff_heatmap,
        gradient_heatmap,
        updates_heatmap,
    )
    from gradflow.plots.output import render, save
    from gradflow.plots.selection import TimeWindow
    from gradflow.plots.tables import Table, best_losses, best_losses_table

# Public name -> its module, imported on first use, so that `gradflow info`, which draws no
# figure, does not import matplotlib. FIGURES and TABLES import every module of the package
# (each registers its figures) the first time they are read.
_LAZY = {
    "FIGURES": "catalog",
    "TABLES": "catalog",
    "PlotWarning": "catalog",
    "depth_profile": "curves",
    "learning_curves": "curves",
    "shortcut_share": "curves",
    "activation_heatmap": "heatmap",
    "diff_heatmap": "heatmap",
    "gradient_heatmap": "heatmap",
    "updates_heatmap": "heatmap",
    "render": "output",
    "save": "output",
    "TimeWindow": "selection",
    "Table": "tables",
    "best_losses": "tables",
    "best_losses_table": "tables",
}

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
    "shortcut_share",
    "updates_heatmap",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradflow.plots' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gradflow.plots.{module}"), name)
    globals()[name] = value
    return value
