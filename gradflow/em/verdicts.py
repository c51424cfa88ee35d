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

A 95 % interval of the five-seed Q is not where another set of seeds lands: a replication
has its own seed noise. :func:`gradflow.em.intervals.replication_interval` gives that
range, a 95 % prediction interval (Welch t on the log scale) for the Q that a replication
with fresh seeds gives, and :func:`compare` checks a replication's Q against it and sets
the two verdicts side by side.

``python -m gradflow.em.verdicts ROOT OUT [REPLICATION_ROOT]`` writes
``OUT/verdicts.{csv,md}``, the per-run ratios ``OUT/centre_edge.{csv,md}`` and, given a
replication's runs, ``OUT/replication.{csv,md}``.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gradflow.analysis import centre_edge_ratio
from gradflow.em.intervals import RESAMPLES, bootstrap_ratio, replication_interval
from gradflow.errors import GradflowError
from gradflow.plots.tables import Cell, Table
from gradflow.runfile import open_run
from gradflow.safefile import atomic_write

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
    """One prediction's estimate, interval and verdict at one scale, condition, quantity.

    ``low``, ``high``: the estimate's 95 % bootstrap interval; ``again_low``,
    ``again_high``: the 95 % range of the Q that a replication with as many fresh seeds
    gives (:func:`gradflow.em.intervals.replication_interval`).
    """

    scale: str
    condition: str
    prediction: Prediction
    quantity: str
    estimate: float
    low: float
    high: float
    verdict: str
    seeds: tuple[int, int]  # seeds of the numerator's and the denominator's panel
    again_low: float = math.nan
    again_high: float = math.nan


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


def verdict(prediction: Prediction, low: float, high: float, seeds: tuple[int, int]) -> str:
    """The verdict on ``prediction`` from its interval ``[low, high]`` and the number of
    seeds of each of its two panels."""
    if min(seeds) < MIN_SEEDS:
        return TOO_FEW
    above, below = low > prediction.threshold, high < prediction.threshold
    if above or below:
        return HOLDS if above == (prediction.side == "above") else FAILS
    return UNRESOLVED


def _per_panel(
    ratios: Mapping[RunKey, Mapping[str, float]], scale: str, condition: str, quantity: str
) -> dict[str, list[float]]:
    """Each panel's usable values (finite and positive) of one cell, in seed order."""
    per_panel: dict[str, list[float]] = {letter: [] for letter in PANELS}
    for key, values in sorted(ratios.items(), key=lambda item: item[0].seed):
        value = values.get(quantity, math.nan)
        here = (key.scale, key.condition) == (scale, condition)
        if here and math.isfinite(value) and value > 0:
            per_panel[key.panel].append(value)
    return per_panel


def verdicts(ratios: Mapping[RunKey, Mapping[str, float]]) -> list[Verdict]:
    """Every prediction's verdict per scale, condition and quantity.

    A run whose ratio is not finite and positive (e.g. a quantity it did not record) does
    not count as a seed of that quantity.
    """
    cells = sorted({(key.scale, key.condition) for key in ratios}, key=_cell_order)
    out = []
    for scale, condition in cells:
        for quantity in QUANTITIES:
            per_panel = _per_panel(ratios, scale, condition, quantity)
            for prediction in PREDICTIONS:
                x, y = per_panel[prediction.numerator], per_panel[prediction.denominator]
                seeds = (len(x), len(y))
                estimate = low = high = math.nan
                if min(seeds) > 0:
                    estimate, low, high = bootstrap_ratio(x, y)
                judged = verdict(prediction, low, high, seeds)
                again_low, again_high = replication_interval(x, y, seeds)
                out.append(
                    Verdict(
                        scale,
                        condition,
                        prediction,
                        quantity,
                        estimate,
                        low,
                        high,
                        judged,
                        seeds,
                        again_low,
                        again_high,
                    )
                )
    return out


@dataclass(frozen=True)
class Replication:
    """A replication's result beside the original's, for one prediction and cell.

    ``low``, ``high``: the original's 95 % prediction interval for a replication with the
    replication's seed counts (:func:`replication_interval`).
    """

    original: Verdict
    replication: Verdict
    low: float
    high: float

    @property
    def inside(self) -> bool:
        """Whether the replication's Q lies in the predicted range."""
        return self.low <= self.replication.estimate <= self.high

    @property
    def agreement(self) -> str:
        """``agrees`` (same verdict), ``contradicts`` (one holds where the other does
        not hold) or ``differs`` (one of them not resolved or with too few seeds)."""
        pair = {self.original.verdict, self.replication.verdict}
        if len(pair) == 1:
            return "agrees"
        return "contradicts" if pair == {HOLDS, FAILS} else "differs"


def compare(
    original: Mapping[RunKey, Mapping[str, float]],
    replication: Mapping[RunKey, Mapping[str, float]],
) -> list[Replication]:
    """The replication's verdicts against the original's, in every cell (scale, condition)
    that both have.

    Args:
        original: per-run ratios of the ablation (:func:`run_ratios`).
        replication: per-run ratios of runs with other seeds at the same cells.

    Returns:
        One :class:`Replication` per prediction, quantity and shared cell.
    """
    first = {(v.scale, v.condition, v.prediction.letter, v.quantity): v for v in verdicts(original)}
    out = []
    for again in verdicts(replication):
        found = first.get((again.scale, again.condition, again.prediction.letter, again.quantity))
        if found is None:
            continue
        panels = _per_panel(original, found.scale, found.condition, found.quantity)
        low, high = replication_interval(
            panels[found.prediction.numerator], panels[found.prediction.denominator], again.seeds
        )
        out.append(Replication(found, again, low, high))
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
        "replication 95 % low",
        "replication 95 % high",
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
            v.again_low,
            v.again_high,
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


def replication_table(rows: Iterable[Replication]) -> Table:
    """A replication beside the original: one row per cell, prediction and quantity."""
    columns = [
        "scale",
        "condition",
        "prediction",
        "quantity",
        "Q",
        "replication Q",
        "predicted 95 % low",
        "predicted 95 % high",
        "inside",
        "verdict",
        "replication verdict",
        "agreement",
        "replication seeds",
    ]
    table: list[list[Cell]] = [
        [
            r.original.scale,
            r.original.condition,
            f"({r.original.prediction.letter}) {r.original.prediction.claim}",
            r.original.quantity,
            r.original.estimate,
            r.replication.estimate,
            r.low,
            r.high,
            "yes" if r.inside else "no",
            r.original.verdict,
            r.replication.verdict,
            r.agreement,
            f"{r.replication.seeds[0]}/{r.replication.seeds[1]}",
        ]
        for r in rows
    ]
    return Table(columns, table)


def _finished_ratios(root: Path) -> dict[RunKey, dict[str, float]]:
    runs = find_runs(root)
    if not runs:
        raise GradflowError(
            f"{root}: no finished ablation runs (<scale>/<panel>-<condition>-sN.h5)"
        )
    return run_ratios(runs)


def _write(out: Path, name: str, table: Table, intro: str) -> None:
    with atomic_write(out / f"{name}.csv") as file:
        file.write(table.to_csv().encode())
    with atomic_write(out / f"{name}.md") as file:
        file.write((intro + table.to_markdown()).encode())


def write_tables(
    root: Path, out: Path, replication_root: Path | None = None
) -> tuple[list[Verdict], list[Replication]]:
    """Write the ablation's tables.

    Args:
        root: the ablation's runs (``<scale>/<panel>-<condition>-sN.h5``, finished ones).
        out: folder for ``verdicts.{csv,md}`` and ``centre_edge.{csv,md}`` (per-run
            ratios), and ``replication.{csv,md}`` given ``replication_root``.
        replication_root: runs of the same cells with other seeds, or None.

    Returns:
        The verdicts, and the replication's comparison (empty without one).
    """
    ratios = _finished_ratios(root)
    rows = verdicts(ratios)
    again = compare(ratios, _finished_ratios(replication_root)) if replication_root else []
    out.mkdir(parents=True, exist_ok=True)
    method = (
        f"95 % percentile bootstrap interval ({RESAMPLES} resamples, seeds resampled per "
        f"panel); verdicts need {MIN_SEEDS} seeds per panel. Written by `python -m "
        "gradflow.em.verdicts`.\n\n"
    )
    _write(
        out,
        "verdicts",
        verdict_table(rows),
        "Q: ratio of the geometric means over seeds of two panels' centre/edge ratios; "
        "replication: the 95 % range of the Q that as many fresh seeds give (Welch t "
        "prediction interval on the log scale); " + method,
    )
    _write(
        out,
        "centre_edge",
        ratio_table(ratios),
        "Centre/edge ratio per run (central third of the conv layers over the outer "
        "thirds; below 1: the centre is starved).\n\n",
    )
    if replication_root:
        _write(
            out,
            "replication",
            replication_table(again),
            f"Runs in {replication_root} (seeds the ablation did not use) against those in "
            f"{root}. predicted: the 95 % range of a replication's Q with its seed counts "
            "(Welch t prediction interval on the log scale); inside: the replication's Q is "
            "in it. Verdicts: " + method,
        )
    return rows, again


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradflow.em.verdicts ROOT OUT [REPLICATION_ROOT]``: write the tables,
    print the verdicts (and the replication's comparison)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print(
            "usage: python -m gradflow.em.verdicts RUNS_ROOT OUT_DIR [REPLICATION_ROOT]",
            file=sys.stderr,
        )
        return 2
    try:
        rows, again = write_tables(
            Path(args[0]), Path(args[1]), Path(args[2]) if len(args) == 3 else None
        )
    except GradflowError as err:
        print(f"gradflow: error: {err}", file=sys.stderr)
        return 2
    print(verdict_table(rows).to_markdown(), end="")
    if again:
        inside = sum(r.inside for r in again)
        print(f"\nreplication: {inside} of {len(again)} Q inside their predicted range")
        print(replication_table(again).to_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
