"""Numbers that summarise a run's update flow (the project's headline measurement)."""

from __future__ import annotations

import numpy as np

from gradflow.errors import GradflowError
from gradflow.store import Run


def centre_edge_ratio(run: Run, stat: str = "update_abs_mean", kind: str = "conv") -> float:
    """Mean per-epoch ``stat`` of the central third of the ``kind`` layers (by depth) over
    that of the outer thirds (the first and last thirds together).

    Below 1 the centre of the network changes less than its ends: the paper's starved
    bottleneck. Each layer's values are averaged over all closed epochs first, so every
    layer weighs the same.
    """
    layers = sorted((lay for lay in run.layers if lay.kind == kind), key=lambda lay: lay.depth)
    if len(layers) < 3:
        raise GradflowError(f"{run.path}: needs at least 3 {kind} layers, has {len(layers)}")
    if run.n_epochs == 0:
        raise GradflowError(f"{run.path}: no closed epochs, so no per-epoch updates")
    values = np.nanmean(run.stat("epoch", stat, layers=[lay.index for lay in layers]), axis=0)
    third = len(layers) // 3
    centre = values[third : len(layers) - third]
    edges = np.concatenate([values[:third], values[len(layers) - third :]])
    return float(np.mean(centre) / np.mean(edges))
