"""A statistic as a [time bin, layer] matrix, streamed from the run file block by block.

Long runs never sit in memory as a whole: rows are read in blocks and averaged into at most
``max_bins`` time bins (NaN-ignoring mean: NaN means the layer did not run at that step).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from gradflow.errors import GradflowError
from gradflow.plots.selection import TimeWindow, Unit, measured_columns, parse_stat
from gradflow.runfile import Layer, Run
from gradflow.runfile.validate import BIN_BYTES, BLOCK_BYTES

MAX_TIME_BINS = 2000
BLOCK_ROWS = 8192


@dataclass(frozen=True)
class LayerTime:
    """``values[bin, layer]`` (layers in drawn order), the bins' time ``edges`` [B + 1] and
    the first and last stored time coordinate in each bin, ``spans`` [B, 2]."""

    values: np.ndarray
    edges: np.ndarray
    spans: np.ndarray
    unit: Unit
    stat: str
    layers: list[Layer]

    def measured(self) -> tuple[LayerTime, int]:
        """These data without the layers never measured in them
        (:func:`~gradflow.plots.selection.measured_columns`), and how many were left out."""
        keep = measured_columns(self.values)
        return self.take(keep), len(self.layers) - len(keep)

    def take(self, columns: Sequence[int] | np.ndarray) -> LayerTime:
        """These data for the layers at ``columns`` only."""
        picked = np.asarray(columns, dtype=np.int64)
        return replace(self, values=self.values[:, picked], layers=[self.layers[i] for i in picked])


def time_coords(run: Run, stat: str, unit: Unit) -> np.ndarray:
    """The time coordinate of each stored row of ``stat`` (epoch numbers or steps)."""
    probe, _ = parse_stat(run, stat)
    if probe == "epoch":
        if unit == "step":
            raise GradflowError(
                f"{stat} is stored per epoch and has no per-step values; use --epochs or a "
                f"per-step statistic such as param/{stat.split('/', 1)[1]}"
            )
        if run.n_epochs == 0:
            raise GradflowError(
                f"run {run.path.name} has no closed epochs; use --steps or a per-step statistic"
            )
        return run.epochs
    if run.n_steps == 0:
        raise GradflowError(f"run {run.path.name} has no recorded steps")
    return run.epoch if unit == "epoch" else run.steps


def natural_unit(stat: str) -> Unit:
    """Per-epoch statistics are drawn against epochs, per-step ones against steps."""
    return "epoch" if stat.startswith("epoch/") else "step"


def window_rows(coords: np.ndarray, window: TimeWindow | None) -> tuple[int, int]:
    """Rows ``[a, b)`` whose (sorted) coordinate lies in ``window``; an empty one is an error."""
    a, b = 0, len(coords)
    if window is not None:
        if window.start is not None:
            a = int(np.searchsorted(coords, window.start, "left"))
        if window.stop is not None:
            b = int(np.searchsorted(coords, window.stop, "left"))
    if a >= b:
        have = f"{coords[0]}..{coords[-1]}" if len(coords) else "none"
        desc = window.describe() if window else "the run"
        raise GradflowError(f"no rows in {desc} (the run has {have})")
    return a, b


def bin_starts(coords: np.ndarray, max_bins: int) -> np.ndarray:
    """First row of each bin: one bin per distinct coordinate, merged k at a time when
    there are more than ``max_bins`` of them."""
    groups = np.flatnonzero(np.diff(coords)) + 1
    starts = np.concatenate([[0], groups])
    k = -(-len(starts) // max_bins)
    return starts[::k]


def bin_means(
    blocks: Iterable[tuple[int, np.ndarray]], starts: np.ndarray, n_cols: int
) -> np.ndarray:
    """NaN-ignoring mean of rows per bin; ``blocks`` yields ``(first_row, rows)`` in order
    and bin ``i`` holds rows ``starts[i]`` up to ``starts[i+1]``."""
    sums = np.zeros((len(starts), n_cols))
    counts = np.zeros((len(starts), n_cols))
    for first, block in blocks:
        last = first + len(block)
        b0 = int(np.searchsorted(starts, first, "right")) - 1
        b1 = int(np.searchsorted(starts, last, "left"))
        cuts = np.concatenate([[0], starts[b0 + 1 : b1] - first])
        seen = ~np.isnan(block)
        sums[b0:b1] += np.add.reduceat(np.where(seen, block, 0.0), cuts, axis=0, dtype=np.float64)
        counts[b0:b1] += np.add.reduceat(seen, cuts, axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def load(
    run: Run,
    stat: str,
    layers: Sequence[Layer],
    window: TimeWindow | None = None,
    max_bins: int = MAX_TIME_BINS,
) -> LayerTime:
    """``stat`` of ``layers`` binned along time, read block by block.

    Blocks hold at most :data:`~gradflow.runfile.validate.BLOCK_BYTES` and the bins'
    sums and counts :data:`~gradflow.runfile.validate.BIN_BYTES`: with very many layers,
    fewer rows per block and fewer time bins than ``max_bins``.
    """
    probe, name = parse_stat(run, stat)
    unit = window.unit if window else natural_unit(stat)
    coords = time_coords(run, stat, unit)
    a, b = window_rows(coords, window)
    coords = coords[a:b]
    columns = np.array([lay.index for lay in layers], dtype=np.int64)
    starts = bin_starts(coords, max(1, min(max_bins, BIN_BYTES // (16 * max(len(columns), 1)))))
    # Rows are read whole (every layer's column, floats of up to 8 bytes), then the drawn
    # columns taken.
    block_rows = max(1, min(BLOCK_ROWS, BLOCK_BYTES // (8 * run.n_layers)))

    def blocks() -> Iterable[tuple[int, np.ndarray]]:
        for first in range(a, b, block_rows):
            rows = slice(first, min(b, first + block_rows))
            yield first - a, run.stat(probe, name, rows=rows, layers=columns)

    values = bin_means(blocks(), starts, len(columns))
    spans = np.stack([coords[starts], coords[np.append(starts[1:], len(coords)) - 1]], axis=1)
    return LayerTime(values, bin_edges(spans), spans, unit, stat, list(layers))


def bin_edges(spans: np.ndarray) -> np.ndarray:
    """Edges [B + 1] of bins whose first and last coordinates are ``spans`` [B, 2]: halfway
    between neighbouring bins, so that irregularly spaced steps (a schedule, an overhead
    budget) sit at their true positions; the outer bins reach out by half the gap to
    their neighbour (by 0.5 for a single bin)."""
    spans = spans.astype(np.float64)
    inner = (spans[:-1, 1] + spans[1:, 0]) / 2
    lead = (spans[1, 0] - spans[0, 1]) / 2 if len(spans) > 1 else 0.5
    trail = (spans[-1, 0] - spans[-2, 1]) / 2 if len(spans) > 1 else 0.5
    return np.concatenate([[spans[0, 0] - lead], inner, [spans[-1, 1] + trail]])


def common_window(runs: Sequence[Run], stat: str, window: TimeWindow | None) -> TimeWindow:
    """``window`` narrowed to the time range every run covers (for run-to-run differences)."""
    unit = window.unit if window else natural_unit(stat)
    coords = [time_coords(run, stat, unit) for run in runs]
    start = max(int(c[0]) for c in coords)
    stop = min(int(c[-1]) for c in coords) + 1
    if window is not None:
        start = max(start, window.start) if window.start is not None else start
        stop = min(stop, window.stop) if window.stop is not None else stop
    return TimeWindow(unit, start, stop)
