"""Do the paper's four predictions hold? Verdicts with bootstrap intervals over seeds.

The ablation (``figures/ablation.sh``) records the four Fig. 3 panels under several
training conditions, at several scales, several seeds each, into
``ROOT/<crop>px-<steps>steps/<panel>-<condition>-s<seed>.h5`` (a ``.done`` marker beside
each finished run). For every run this module computes the centre/edge ratio
(:func:`gradflow.analysis.centre_edge_ratio`) of two quantities:

- ``update``: the per-epoch update ``epoch/update_abs_mean`` (the paper's figure);
- ``gradient``: the gradient reaching each layer's output ``grad_output/norm``.

Each prediction compares two panels by the ratio of their geometric means over seeds,
``Q = exp(mean log r_X - mean log r_Y)``, with a 95 % percentile bootstrap interval (the
seeds of each panel resampled with replacement, independently per panel). Its verdict:
``holds`` where the interval lies wholly on the prediction's side of its threshold,
``does not hold`` where it lies wholly on the other side, else ``not resolved at this
scale``; a panel with fewer than :data:`MIN_SEEDS` seeds gives ``too few seeds``.

``python -m gradflow.em.verdicts ROOT OUT`` writes ``OUT/verdicts.{csv,md}`` and the
per-run ratios ``OUT/centre_edge.{csv,md}``.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gradflow.analysis import centre_edge_ratio
from gradflow.errors import GradflowError
from gradflow.plots.tables import Cell, Table
from gradflow.runfile import open_run

PANELS: dict[str, str] = {
    "a": "fig3a-long-short-9",
    "b": "fig3b-long-9",
    "c": "fig3c-long-3",
    "d": "fig3d-long-7-nobn",
}
"""Each Fig. 3 panel's letter and its model preset (the run files' name prefix)."""

QUANTITIES: dict[str, tuple[str, str]] = {
    "update": ("epoch", "update_abs_mean"),
    "gradient": ("grad_output", "norm"),
}
"""Each quantity's (probe, statistic) in the run file."""

MIN_SEEDS = 5
RESAMPLES = 10_000
RNG_SEED = 20160816  # fixed: the same runs always give the same intervals
LEVEL = 0.95

HOLDS, FAILS, UNRESOLVED, TOO_FEW = (
    "holds",
    "does not hold",
    "not resolved at this scale",
    "too few seeds",
)

_SCALE = re.compile(r"(\d+)px-(\d+)steps")


@dataclass(frozen=True, order=True)
class RunKey:
    """Where a run sits in the ablation: scale folder, condition, panel letter, seed."""

    scale: str
    condition: str
    panel: str
    seed: int


@dataclass(frozen=True)
class Prediction:
    """A prediction about ``Q = r_numerator / r_denominator`` (ratios of geometric means).

    It holds where the whole interval is ``side`` of ``threshold`` and does not hold where
    the whole interval is on the other side.
    """

    letter: str
    claim: str
    numerator: str
    denominator: str
    side: Literal["above", "below"]
    threshold: float

    @property
    def test(self) -> str:
        """The ratio and the side it must fall on, e.g. ``r_a / r_b > 1``."""
        sign = ">" if self.side == "above" else "<"
        return f"r_{self.numerator} / r_{self.denominator} {sign} {self.threshold:g}"


PREDICTIONS: tuple[Prediction, ...] = (
    Prediction("a", "long + short skips update every layer", "a", "b", "above", 1.0),
    Prediction("b", "long skips only, 9 blocks: the centre is starved", "b", "c", "below", 1.0),
    Prediction("c", "long skips only, 3 blocks: fine (within 2x of (a))", "c", "a", "above", 0.5),
    Prediction("d", "no batch norm: updates fade towards the centre", "d", "a", "below", 1.0),
)


@dataclass(frozen=True)
class Verdict:
    """One prediction's estimate, interval and verdict at one scale, condition, quantity."""

    scale: str
    condition: str
    prediction: Prediction
    quantity: str
    estimate: float
    low: float
    high: float
    verdict: str
    seeds: tuple[int, int]  # seeds of the numerator's and the denominator's panel


def parse_run_path(path: Path) -> RunKey | None:
    """The ablation key of ``ROOT/<crop>px-<steps>steps/<panel>-<condition>-s<seed>.h5``,
    or None for a file that is not an ablation run of a known panel."""
    if path.suffix != ".h5" or not _SCALE.fullmatch(path.parent.name):
        return None
    for letter, model in PANELS.items():
        rest = path.stem.removeprefix(model + "-")
        if rest == path.stem:
            continue
        condition, sep, seed = rest.rpartition("-s")
        if sep and condition and seed.isdigit():
            return RunKey(path.parent.name, condition, letter, int(seed))
    return None


def find_runs(root: Path, finished_only: bool = True) -> dict[RunKey, Path]:
    """The ablation runs under ``root``, by key (``finished_only``: those with a ``.done``
    marker beside them, so a run still being recorded is left out)."""
    if not root.is_dir():
        raise GradflowError(f"{root}: no such directory of ablation runs")
    runs = {}
    for path in sorted(root.glob("*/*.h5")):
        key = parse_run_path(path)
        if key is not None and (not finished_only or path.with_suffix(".done").exists()):
            runs[key] = path
    return runs


def run_ratios(runs: Mapping[RunKey, Path]) -> dict[RunKey, dict[str, float]]:
    """Each run's centre/edge ratio of every quantity in :data:`QUANTITIES`."""
    out = {}
    for key, path in runs.items():
        with open_run(path) as run:
            out[key] = {
                name: centre_edge_ratio(run, stat, probe=probe)
                for name, (probe, stat) in QUANTITIES.items()
            }
    return out


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


def verdict(prediction: Prediction, low: float, high: float, seeds: tuple[int, int]) -> str:
    """The verdict on ``prediction`` from its interval ``[low, high]`` and the number of
    seeds of each of its two panels."""
    if min(seeds) < MIN_SEEDS:
        return TOO_FEW
    above, below = low > prediction.threshold, high < prediction.threshold
    if above or below:
        return HOLDS if above == (prediction.side == "above") else FAILS
    return UNRESOLVED


def verdicts(ratios: Mapping[RunKey, Mapping[str, float]]) -> list[Verdict]:
    """Every prediction's verdict per scale, condition and quantity.

    A run whose ratio is not finite and positive (e.g. a quantity it did not record) does
    not count as a seed of that quantity.
    """
    cells = sorted({(key.scale, key.condition) for key in ratios}, key=_cell_order)
    out = []
    for scale, condition in cells:
        for quantity in QUANTITIES:
            per_panel: dict[str, list[float]] = {letter: [] for letter in PANELS}
            for key, values in sorted(ratios.items(), key=lambda item: item[0].seed):
                value = values.get(quantity, math.nan)
                here = (key.scale, key.condition) == (scale, condition)
                if here and math.isfinite(value) and value > 0:
                    per_panel[key.panel].append(value)
            for prediction in PREDICTIONS:
                x, y = per_panel[prediction.numerator], per_panel[prediction.denominator]
                seeds = (len(x), len(y))
                estimate = low = high = math.nan
                if min(seeds) > 0:
                    estimate, low, high = bootstrap_ratio(x, y)
                judged = verdict(prediction, low, high, seeds)
                out.append(
                    Verdict(
                        scale, condition, prediction, quantity, estimate, low, high, judged, seeds
                    )
                )
    return out


def _cell_order(cell: tuple[str, str]) -> tuple[int, int, str, str]:
    match = _SCALE.fullmatch(cell[0])
    crop, steps = (int(match[1]), int(match[2])) if match else (0, 0)
    return (steps, crop, cell[0], cell[1])


def verdict_table(rows: Iterable[Verdict]) -> Table:
    """The verdicts as a table: one row per scale, condition, prediction and quantity."""
    columns = [
        "scale",
        "condition",
        "prediction",
        "test",
        "quantity",
        "Q",
        "95 % low",
        "95 % high",
        "verdict",
        "seeds",
    ]
    table: list[list[Cell]] = [
        [
            v.scale,
            v.condition,
            f"({v.prediction.letter}) {v.prediction.claim}",
            v.prediction.test,
            v.quantity,
            v.estimate,
            v.low,
            v.high,
            v.verdict,
            f"{v.seeds[0]}/{v.seeds[1]}",
        ]
        for v in rows
    ]
    return Table(columns, table)


def ratio_table(ratios: Mapping[RunKey, Mapping[str, float]]) -> Table:
    """The per-run centre/edge ratios as a table."""
    order = sorted(ratios, key=lambda k: (*_cell_order((k.scale, k.condition)), k.panel, k.seed))
    rows: list[list[Cell]] = [
        [k.scale, k.condition, PANELS[k.panel], k.seed, *(ratios[k][q] for q in QUANTITIES)]
        for k in order
    ]
    return Table(["scale", "condition", "panel", "seed", *QUANTITIES], rows)


def write_tables(root: Path, out: Path) -> list[Verdict]:
    """Read the finished ablation runs under ``root``; write ``verdicts.{csv,md}`` and
    ``centre_edge.{csv,md}`` (per-run ratios) into ``out``; return the verdicts."""
    runs = find_runs(root)
    if not runs:
        raise GradflowError(
            f"{root}: no finished ablation runs (<scale>/<panel>-<condition>-sN.h5)"
        )
    ratios = run_ratios(runs)
    rows = verdicts(ratios)
    out.mkdir(parents=True, exist_ok=True)
    preamble = (
        f"Q: ratio of the geometric means over seeds of two panels' centre/edge ratios; 95 % "
        f"percentile bootstrap interval ({RESAMPLES} resamples, seeds resampled per panel); "
        f"verdicts need {MIN_SEEDS} seeds per panel. Written by `python -m "
        "gradflow.em.verdicts`.\n\n"
    )
    for name, table, intro in (
        ("verdicts", verdict_table(rows), preamble),
        (
            "centre_edge",
            ratio_table(ratios),
            "Centre/edge ratio per run (central third of "
            "the conv layers over the outer thirds; below 1: the centre is starved).\n\n",
        ),
    ):
        (out / f"{name}.csv").write_text(table.to_csv(), encoding="utf-8")
        (out / f"{name}.md").write_text(intro + table.to_markdown(), encoding="utf-8")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradflow.em.verdicts ROOT OUT``: write the tables, print the verdicts."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m gradflow.em.verdicts RUNS_ROOT OUT_DIR", file=sys.stderr)
        return 2
    try:
        rows = write_tables(Path(args[0]), Path(args[1]))
    except GradflowError as err:
        print(f"gradflow: error: {err}", file=sys.stderr)
        return 2
    print(verdict_table(rows).to_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
