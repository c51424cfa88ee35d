"""One number per run for comparing runs in a sweep, in a registry (:data:`SCALARS`).

Each is computed once per run and cached with the run's summary; NaN where a run does not
hold what it needs (no logged loss, no validation, fewer than three conv layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradflow.analysis import centre_edge_ratio
from gradflow.errors import GradflowError
from gradflow.registry import Registry
from gradflow.runfile import Run


@dataclass(frozen=True)
class Scalar:
    """A number summarising a run: its axis label, how to compute it, what it is."""

    label: str
    compute: Callable[[Run], float]
    doc: str


SCALARS: Registry[Scalar] = Registry("sweep scalar")
"""Every scalar a sweep computes per run, by name (``final_loss``, ...)."""


def register_scalar(name: str, label: str) -> Callable[[Callable[[Run], float]], Scalar]:
    """Register ``fn(run) -> float`` as scalar ``name``; its docstring's first line says
    what it is.

    Args:
        name: the registry name (a column of ``Sweep.to_dataframe()``).
        label: the axis label on the sweep page.

    Returns:
        A decorator that registers and returns the :class:`Scalar`.
    """

    def add(fn: Callable[[Run], float]) -> Scalar:
        return SCALARS.register(name)(Scalar(label, fn, (fn.__doc__ or "").strip()))

    return add


@register_scalar("final_loss", "final loss (mean over the last epoch's steps)")
def final_loss(run: Run) -> float:
    """Mean logged loss over the steps of the last recorded epoch (NaN: none logged)."""
    if run.n_steps == 0:
        return float("nan")
    epoch, loss = run.epoch, run.loss
    last = loss[(epoch == epoch[-1]) & np.isfinite(loss)]
    return float(np.mean(last, dtype=np.float64)) if len(last) else float("nan")


@register_scalar("centre_edge", "centre / edge ratio of the updates")
def centre_edge(run: Run) -> float:
    """Centre/edge ratio of the mean update of the conv layers (per epoch where epochs were
    closed, else per step; see :func:`gradflow.analysis.centre_edge_ratio`)."""
    try:
        if run.n_epochs and "update_abs_mean" in run.epoch_stats():
            return centre_edge_ratio(run)
        if run.n_steps and "update_abs_mean" in run.probes().get("param", []):
            return centre_edge_ratio(run, probe="param")
    except GradflowError:  # fewer than three conv layers
        pass
    return float("nan")


@register_scalar("best_val_loss", "best validation loss")
def best_val_loss(run: Run) -> float:
    """Lowest per-epoch ``val_loss`` (NaN: never validated)."""
    val = run.metrics.get("val_loss")
    if val is None or not np.isfinite(val).any():
        return float("nan")
    return float(np.nanmin(val))
