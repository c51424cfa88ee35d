"""The figure to draw when none is named: the most useful one for what the runs hold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradflow.errors import GradflowError
from gradflow.plots.style import FIXED_LIMITS
from gradflow.runfile import Run

EPOCH_UPDATES = "epoch/update_abs_mean"
GRADIENT_NORMS = "param/grad_norm"


@dataclass(frozen=True)
class View:
    """A registered figure, the statistic it draws, its colour scale, and why it was chosen."""

    figure: str
    stat: str
    log: bool
    reason: str

    def describe(self) -> str:
        """One line: ``updates-heatmap of epoch/update_abs_mean, log colour (...)``."""
        scale = "log" if self.log else "linear"
        return f"{self.figure} of {self.stat}, {scale} colour ({self.reason})"


def _holds(run: Run, stat: str) -> bool:
    probe, name = stat.split("/", 1)
    if probe == "epoch":
        return name in run.epoch_stats() and run.n_epochs > 0
    return name in run.probes().get(probe, []) and run.n_steps > 0


def _has_positive(run: Run, stat: str) -> bool:
    probe, name = stat.split("/", 1)
    # Block by block (bounded in bytes): the first block of a long run nearly always decides.
    for _, block in run.stat_blocks(probe, name):
        if np.any(np.isfinite(block) & (block > 0)):
            return True
    return False


def default_view(runs: Sequence[Run], stat: str | None = None) -> View:
    """What to draw for ``runs`` when no figure is named.

    The paper's view, the heat map of per-epoch updates (``epoch/update_abs_mean``), where
    every run closed an epoch; else the gradient norm of each layer per step
    (``param/grad_norm``); else the first per-step statistic that every run holds. ``stat``
    (``probe/name``) chooses the statistic instead. Log colour where the statistic has
    positive values (updates and norms span decades), linear otherwise and for fractions.

    Args:
        runs: the opened runs, one panel each.
        stat: a statistic to draw instead of the chosen one.

    Returns:
        The figure, its statistic and colour scale, and the reason, for the user.
    """
    if not runs:
        raise GradflowError("no run files to draw")
    if stat is not None:
        view = View("gradient-heatmap", stat, True, "the statistic asked for")
    elif all(_holds(run, EPOCH_UPDATES) for run in runs):
        epochs = "/".join(str(run.n_epochs) for run in runs)
        view = View("updates-heatmap", EPOCH_UPDATES, True, f"closed epochs: {epochs}")
    elif all(_holds(run, GRADIENT_NORMS) for run in runs):
        view = View("gradient-heatmap", GRADIENT_NORMS, True, "no closed epoch: per step")
    else:
        shared = [
            f"{probe}/{name}"
            for probe, names in runs[0].probes().items()
            for name in names
            if all(_holds(run, f"{probe}/{name}") for run in runs)
        ]
        if not shared:
            raise GradflowError(
                "the runs hold no statistic with rows in common (no closed epoch, no "
                "recorded step); name a figure and a --stat (gradflow plot --list)"
            )
        view = View("gradient-heatmap", shared[0], True, "no epoch updates or gradient norms")
    if view.stat in FIXED_LIMITS or not all(
        _holds(run, view.stat) and _has_positive(run, view.stat) for run in runs
    ):
        view = View(view.figure, view.stat, False, view.reason)
    return view
