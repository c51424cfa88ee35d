"""Numbers that summarise a run's update flow (the project's headline measurement)."""

from __future__ import annotations

import numpy as np

from gradflow.errors import GradflowError
from gradflow.runfile import Run


def centre_edge_ratio(
    run: Run, stat: str = "update_abs_mean", kind: str = "conv", probe: str = "epoch"
) -> float:
    """Mean ``probe/stat`` of the central third of the ``kind`` layers (by depth) over that
    of the outer thirds (the first and last thirds together).

    By default the per-epoch update ``epoch/update_abs_mean``: below 1 the centre of the
    network changes less than its ends, the paper's starved bottleneck. A step statistic
    (e.g. ``probe="grad_output", stat="norm"``: the gradient reaching each layer) is
    averaged over the recorded steps. Each layer's values are averaged over time first, so
    every layer weighs the same.
    """
    layers = sorted((lay for lay in run.layers if lay.kind == kind), key=lambda lay: lay.depth)
    if len(layers) < 3:
        raise GradflowError(f"{run.path}: needs at least 3 {kind} layers, has {len(layers)}")
    if probe == "epoch" and run.n_epochs == 0:
        raise GradflowError(f"{run.path}: no closed epochs, so no per-epoch updates")
    if probe != "epoch" and run.n_steps == 0:
        raise GradflowError(f"{run.path}: no recorded steps, so no {probe}/{stat}")
    # In float64: float32 statistics near their largest value (a crafted file) would
    # overflow a float32 mean.
    stored = run.stat(probe, stat, layers=[lay.index for lay in layers])
    values = np.nanmean(stored.astype(np.float64), axis=0)
    third = len(layers) // 3
    centre = values[third : len(layers) - third]
    edges = np.concatenate([values[:third], values[len(layers) - third :]])
    return float(np.mean(centre) / np.mean(edges))
