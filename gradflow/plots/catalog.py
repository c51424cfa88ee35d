"""The registries the command line reads: image figures and text tables, by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from gradflow.registry import Registry
from gradflow.runfile import Run

if TYPE_CHECKING:
    from gradflow.plots.tables import Table

FIGURES: Registry[Callable[..., Figure]] = Registry("figure", package="gradflow.plots")
"""Every figure: ``fn(runs, **options) -> Figure``; the first docstring line is its summary."""

TABLES: Registry[Callable[[Sequence[Run]], Table]] = Registry("table", package="gradflow.plots")
"""Figures that can also be written as text (``.md`` / ``.csv``): ``fn(runs) -> Table``."""


class PlotWarning(UserWarning):
    """Something a figure shows that the user should hear about (e.g. unmatched layers)."""
