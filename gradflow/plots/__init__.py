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

# Public name -> its module. They load on first use, all modules at once (each registers
# its figures in FIGURES), so that `gradflow info`, which draws no figure, does not import
# matplotlib.
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
    if name not in _LAZY:
        raise AttributeError(f"module 'gradflow.plots' has no attribute {name!r}")
    modules = {m: importlib.import_module(f"gradflow.plots.{m}") for m in set(_LAZY.values())}
    for key, module in _LAZY.items():
        globals()[key] = getattr(modules[module], key)
    return globals()[name]
