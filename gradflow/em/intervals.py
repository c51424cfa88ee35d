"""Intervals for a ratio of geometric means of two groups of seeds.

A prediction of the ablation compares two panels by ``Q = exp(mean log x - mean log y)``
over seeds. :func:`bootstrap_ratio` gives Q's 95 % interval (how sure the estimate is);
:func:`replication_interval` gives the range in which a replication with fresh seeds lands
(wider: the replication has its own seed noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

RESAMPLES = 10_000
RNG_SEED = 20160816  # fixed: the same runs always give the same intervals
LEVEL = 0.95


def bootstrap_ratio(
    x: Sequence[float],
    y: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    seed: int = RNG_SEED,
    level: float = LEVEL,
) -> tuple[float, float, float]:
    """The ratio of geometric means ``exp(mean log x - mean log y)`` and its percentile
    bootstrap interval.

    Args:
        x, y: positive per-seed values of the two panels.
        resamples: bootstrap resamples; each draws ``len(x)`` of ``x`` and ``len(y)`` of
            ``y`` with replacement, independently (all of ``x``'s draws first).
        seed: seed of the ``numpy.random.default_rng`` generator.
        level: the interval's coverage.

    Returns:
        (estimate, low, high).
    """
    log_x, log_y = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    rng = np.random.default_rng(seed)
    pick_x = rng.integers(0, len(log_x), size=(resamples, len(log_x)))
    pick_y = rng.integers(0, len(log_y), size=(resamples, len(log_y)))
    q = np.exp(log_x[pick_x].mean(axis=1) - log_y[pick_y].mean(axis=1))
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(q, [tail, 100 - tail])
    return float(np.exp(log_x.mean() - log_y.mean())), float(low), float(high)


def replication_interval(
    x: Sequence[float],
    y: Sequence[float],
    new: tuple[int, int],
    *,
    level: float = LEVEL,
) -> tuple[float, float]:
    """The range in which a replication's ratio of geometric means falls with probability
    ``level``: a prediction interval on the log scale.

    The replication draws ``new[0]`` fresh seeds of ``x``'s panel and ``new[1]`` of
    ``y``'s. Its log Q differs from this one's by the seed noise of both, so the interval is
    ``log Q +- t * sqrt(v_x (1/n_x + 1/m_x) + v_y (1/n_y + 1/m_y))`` with the sample
    variances ``v`` of the log values and Student's t at the Welch-Satterthwaite degrees of
    freedom (log values taken as normal, each panel with its own variance).

    Args:
        x, y: positive per-seed values of the two panels (at least 2 each).
        new: the replication's seeds of ``x``'s and of ``y``'s panel.
        level: the probability that the replication's Q falls inside.

    Returns:
        (low, high); NaN for fewer than 2 values in a panel.
    """
    log_x, log_y = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    if min(len(log_x), len(log_y)) < 2 or min(new) < 1:
        return math.nan, math.nan
    parts = [
        (float(np.var(logs, ddof=1)) * (1 / len(logs) + 1 / m), len(logs) - 1)
        for logs, m in ((log_x, new[0]), (log_y, new[1]))
    ]
    variance = sum(v for v, _ in parts)
    centre = float(log_x.mean() - log_y.mean())
    if variance == 0:
        return math.exp(centre), math.exp(centre)
    dof = variance**2 / sum(v**2 / df for v, df in parts)
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * math.sqrt(variance)
    return math.exp(centre - half), math.exp(centre + half)
