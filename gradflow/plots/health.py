"""Layer health findings of a run: vanishing or exploding updates, dead units, non-finite values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradflow.plots.binning import load
from gradflow.runfile import Run

VANISH_BELOW = 1e-2  # a layer's update ratio below 1/100 of its kind's median
EXPLODE_ABOVE = 1e2  # ... or above 100x of it
DEAD_ABOVE = 0.9  # mean fraction of zero activations
MAX_LISTED = 3  # layers listed one per line; more are summed up in one line


@dataclass(frozen=True)
class Finding:
    """One problem: which check, which layer, the measured value and how it compares."""

    check: str
    layer: str
    value: str
    detail: str


def _layer_means(run: Run, stat: str) -> np.ndarray:
    # One time bin: the NaN-ignoring mean of every layer over the whole run, streamed.
    return load(run, stat, run.layers, max_bins=1).values[0]


def update_outliers(run: Run) -> list[Finding]:
    """Layers whose mean update ratio is far below / above the median of layers of their kind."""
    if "update_ratio" in run.epoch_stats() and run.n_epochs:
        stat = "epoch/update_ratio"
    elif "update_ratio" in run.probes().get("param", []) and run.n_steps:
        stat = "param/update_ratio"
    else:
        return []
    means = _layer_means(run, stat)
    kinds = np.array([lay.kind for lay in run.layers])
    usable = np.isfinite(means) & (means > 0)
    # One median per kind, not per layer: linear in the number of layers.
    medians = {}
    for kind in np.unique(kinds):
        peers = means[(kinds == kind) & usable]
        if len(peers) >= 2:
            medians[str(kind)] = float(np.median(peers))
    found = []
    for lay, value in zip(run.layers, means, strict=True):
        median = medians.get(lay.kind)
        if median is None or not np.isfinite(value):
            continue
        ratio = value / median
        if VANISH_BELOW <= ratio <= EXPLODE_ABOVE:
            continue
        found.append(
            Finding(
                "vanishing update" if ratio < VANISH_BELOW else "exploding update",
                lay.name,
                f"{value:.2e}",
                f"{stat}: {ratio:.1e} x the median of {lay.kind} layers ({median:.2e})",
            )
        )
    return found


def dead_units(run: Run) -> list[Finding]:
    """Layers whose outputs are zero more than :data:`DEAD_ABOVE` of the time on average."""
    if "zero_fraction" not in run.probes().get("activation", []) or not run.n_steps:
        return []
    means = _layer_means(run, "activation/zero_fraction")
    return [
        Finding("dead units", lay.name, f"{value:.0%}", "mean fraction of zero activations")
        for lay, value in zip(run.layers, means, strict=True)
        if value > DEAD_ABOVE
    ]


def nonfinite(run: Run) -> list[Finding]:
    """Every non-finite event stored in the run."""
    return [
        Finding(
            "non-finite", ev.layer, f"step {ev.step}", f"{ev.probe} (epoch {ev.epoch}) {ev.detail}"
        )
        for ev in run.events
        if ev.kind == "nonfinite"
    ]


# Every statistic of a probe is computed from the same per-layer reductions, so one per
# probe tells whether it was measured: counts where there are some (NaN only when
# unmeasured, never because of non-finite values); for parameters the gradient (NaN where
# no parameter of the layer had one) and the update, only where an optimizer stepped
# (optimizer=None records no update by design).
_MEASURED_BY = {
    "param": ("grad_nonfinite", "update_norm"),
    "activation": ("nonfinite",),
    "grad_output": ("norm",),
}


def never_measured(run: Run) -> list[Finding]:
    """Statistics that are NaN in every row: for a whole probe or for single layers."""
    if not run.n_steps:
        return []
    found = []
    names = np.array(run.layer_names)
    for probe, stats in run.probes().items():
        reported = np.zeros(len(names), bool)  # a layer whose whole probe is missing
        for stat in _MEASURED_BY.get(probe, tuple(stats[:1])):
            if stat not in stats or (stat.startswith("update") and not run.attrs.get("optimizer")):
                continue
            key = f"{probe}/{stat}"
            missing = np.isnan(_layer_means(run, key)) & ~reported
            what = f"{probe}/{stat.split('_')[0]}_*" if probe == "param" else f"{probe}/*"
            detail = f"{key} is NaN in every row"
            if missing.all():
                found.append(Finding("never measured", "(all layers)", what, detail))
            elif missing.sum() > MAX_LISTED:  # one line, e.g. every block's attention out_proj
                shown = ", ".join(names[missing][:MAX_LISTED])
                where = f"{missing.sum()} layers"
                found.append(Finding("never measured", where, what, f"{detail}: {shown}, ..."))
            else:
                found += [Finding("never measured", n, what, detail) for n in names[missing]]
            reported |= missing
    return found


def health(run: Run) -> list[Finding]:
    """All findings, non-finite values first."""
    return nonfinite(run) + never_measured(run) + update_outliers(run) + dead_units(run)
