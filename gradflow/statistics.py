"""Registry of per-layer statistics, each a tiny function of per-layer reductions.

The device computes only a few *reductions* per tensor (sums, sums of squares, counts);
those travel to the host in one copy per recorded step and are combined per layer there.
Every statistic in the run file is a function registered here of those per-layer
reductions, evaluated on the host in float64 (so a statistic costs nothing on the device).

Reductions per probe (numpy float64 arrays ``[L]``, or ``[rows, L]`` for many rows at once:
statistics are element-wise):

- ``param``: ``n`` (trainable elements), ``w_sq`` (sum of W^2 before the step), ``g_sq``
  (sum of grad^2), ``g_nonfinite`` (non-finite grad entries), ``d_sq``, ``d_abs`` and
  ``d_max`` (sum of squares, sum and max of |W_after - W_before|), ``g_dot_d`` (sum of
  grad * (W_before - W_after), with the gradient the optimizer stepped on).
- ``activation``: ``n`` (output elements), ``sum``, ``sum_sq``, ``nonzero`` (entries
  that are not exactly 0; NaN counts as nonzero), ``nonfinite`` (NaN or Inf entries).
- ``grad_output``: ``n`` (elements of the output gradient), ``sum_sq``.
- ``epoch``: like ``param`` but ``d_*`` is the change over the whole epoch (``g_*`` are
  0, ``g_dot_d`` NaN: no one gradient belongs to an epoch).
- ``skip`` (:mod:`gradflow.probes.skip`): per residual block, ``shortcut_sq`` and
  ``branch_sq`` (sums of squares of the gradient reaching the block's input through the
  shortcut and through the residual branch) and ``blocks`` (calls measured); per long skip,
  ``long_sq`` and ``below_sq`` (the gradient reaching the encoder output through the skip
  and through the path below it) and ``long_skips``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gradflow.registry import Registry

Reductions = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Statistic:
    """A named per-layer statistic of one probe."""

    probe: str
    name: str
    doc: str
    compute: Callable[[Reductions], np.ndarray]

    @property
    def key(self) -> str:
        return f"{self.probe}/{self.name}"


STATISTICS: Registry[Statistic] = Registry("statistic")


def statistic(
    probe: str, name: str, doc: str
) -> Callable[[Callable[[Reductions], np.ndarray]], Statistic]:
    """Register ``compute(reductions) -> [L]`` as statistic ``probe/name``."""

    def add(compute: Callable[[Reductions], np.ndarray]) -> Statistic:
        stat = Statistic(probe, name, doc, compute)
        STATISTICS.register(stat.key)(stat)
        return stat

    return add


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(a, np.float64) / np.asarray(b, np.float64)


def _sqrt(a: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.sqrt(a)


# -- parameters (at the optimizer step) -------------------------------------------------
for _probe, _when in (("param", "the optimizer step"), ("epoch", "the epoch")):

    @statistic(_probe, "update_norm", f"||W_after - W_before|| over {_when}")
    def _update_norm(r: Reductions) -> np.ndarray:
        return _sqrt(r["d_sq"])

    @statistic(_probe, "update_ratio", f"||ΔW|| / ||W_before|| over {_when}")
    def _update_ratio(r: Reductions) -> np.ndarray:
        return _div(_sqrt(r["d_sq"]), _sqrt(r["w_sq"]))

    @statistic(_probe, "update_abs_mean", f"mean |ΔW| over {_when} (the paper's quantity)")
    def _update_abs_mean(r: Reductions) -> np.ndarray:
        return _div(r["d_abs"], r["n"])

    @statistic(_probe, "update_abs_max", f"max |ΔW| over {_when}")
    def _update_abs_max(r: Reductions) -> np.ndarray:
        return np.asarray(r["d_max"], np.float64)


@statistic("param", "weight_norm", "||W|| before the optimizer step")
def _weight_norm(r: Reductions) -> np.ndarray:
    return _sqrt(r["w_sq"])


@statistic("param", "grad_norm", "||grad|| at the optimizer step (accumulated, unscaled, reduced)")
def _grad_norm(r: Reductions) -> np.ndarray:
    return _sqrt(r["g_sq"])


@statistic(
    "param",
    "grad_update_cos",
    "cos(∇W, ΔW) of the step: -1 for plain SGD, above -1 with momentum or Adam",
)
def _grad_update_cos(r: Reductions) -> np.ndarray:
    # g_dot_d is taken with d = W_before - W_after, the negated update. Where either norm is
    # 0 the dot product is 0 too: 0 / 0, NaN.
    return _div(-np.asarray(r["g_dot_d"]), _sqrt(r["g_sq"]) * _sqrt(r["d_sq"]))


@statistic("param", "grad_nonfinite", "number of NaN/Inf gradient entries")
def _grad_nonfinite(r: Reductions) -> np.ndarray:
    return np.asarray(r["g_nonfinite"], np.float64)


# -- activations (forward hooks, training mode) ------------------------------------------
@statistic("activation", "mean", "mean of the layer's output")
def _act_mean(r: Reductions) -> np.ndarray:
    return _div(r["sum"], r["n"])


@statistic("activation", "std", "standard deviation of the layer's output")
def _act_std(r: Reductions) -> np.ndarray:
    mean = _div(r["sum"], r["n"])
    with np.errstate(invalid="ignore"):
        var = np.maximum(_div(r["sum_sq"], r["n"]) - mean * mean, 0.0)
    return _sqrt(np.where(np.isfinite(mean), var, np.nan))


@statistic("activation", "zero_fraction", "fraction of exactly-zero outputs (dead units)")
def _act_zero_fraction(r: Reductions) -> np.ndarray:
    return 1.0 - _div(r["nonzero"], r["n"])


@statistic("activation", "nonfinite", "number of NaN/Inf outputs")
def _act_nonfinite(r: Reductions) -> np.ndarray:
    return np.asarray(r["nonfinite"], np.float64)


# -- gradient flowing back out of each layer (backward) ----------------------------------
@statistic("grad_output", "norm", "||dL/d output|| of the layer: the gradient flow itself")
def _gout_norm(r: Reductions) -> np.ndarray:
    return _sqrt(r["sum_sq"])


@statistic("grad_output", "rms", "root mean square of dL/d output")
def _gout_rms(r: Reductions) -> np.ndarray:
    return _sqrt(_div(r["sum_sq"], r["n"]))


# -- skip connections (the skip probe) -----------------------------------------------------
def _measured_norm(sq: np.ndarray, calls: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(np.asarray(calls) > 0, _sqrt(sq), np.nan)


def _share(skip_sq: np.ndarray, other_sq: np.ndarray, calls: np.ndarray) -> np.ndarray:
    skip, other = _measured_norm(skip_sq, calls), _measured_norm(other_sq, calls)
    return _div(skip, skip + other)


@statistic("skip", "shortcut_norm", "||dL/d block input|| through the residual block's shortcut")
def _shortcut_norm(r: Reductions) -> np.ndarray:
    return _measured_norm(r["shortcut_sq"], r["blocks"])


@statistic("skip", "branch_norm", "||dL/d block input|| through the residual branch")
def _branch_norm(r: Reductions) -> np.ndarray:
    return _measured_norm(r["branch_sq"], r["blocks"])


@statistic("skip", "shortcut_share", "shortcut_norm / (shortcut_norm + branch_norm)")
def _shortcut_share(r: Reductions) -> np.ndarray:
    return _share(r["shortcut_sq"], r["branch_sq"], r["blocks"])


@statistic("skip", "long_norm", "||dL/d encoder output|| through the long skip")
def _long_norm(r: Reductions) -> np.ndarray:
    return _measured_norm(r["long_sq"], r["long_skips"])


@statistic("skip", "below_norm", "||dL/d encoder output|| through the path below it")
def _below_norm(r: Reductions) -> np.ndarray:
    return _measured_norm(r["below_sq"], r["long_skips"])


@statistic("skip", "long_share", "long_norm / (long_norm + below_norm)")
def _long_share(r: Reductions) -> np.ndarray:
    return _share(r["long_sq"], r["below_sq"], r["long_skips"])


def names(probe: str) -> list[str]:
    """Statistic names of one probe, in registration order."""
    return [STATISTICS.get(k).name for k in STATISTICS if k.startswith(probe + "/")]


def compute(
    probe: str, reductions: Reductions, only: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Every registered statistic of ``probe`` (or those named in ``only``) from its
    per-layer reductions."""
    chosen = names(probe) if only is None else only
    return {name: STATISTICS.get(f"{probe}/{name}").compute(reductions) for name in chosen}
