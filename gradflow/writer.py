"""The recorder's writer thread: host-side statistics, non-finite detection, HDF5 I/O.

The training thread hands over one packed tensor of reductions per recorded step (already
on its way to the host); this thread waits for it, turns reductions into statistics
(:mod:`gradflow.statistics`), locates the first non-finite value, buffers rows and appends
them to the run file every ``flush_every`` rows or ``flush_seconds`` seconds (the first
commits hold 1, 2, 4, ... rows up to ``flush_every``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradflow import statistics
from gradflow.errors import GradflowError, reason
from gradflow.names import EPOCH_STATS
from gradflow.probes import PROBES, Block, LayerMap
from gradflow.runfile import OVERHEAD_COLUMNS, Event, Layer, RunWriter, StepRows


@dataclass
class RunLayout:
    """What the run file holds and how host vectors map onto layers."""

    path: Path
    layers: list[Layer]
    probes: tuple[str, ...]
    map: LayerMap
    config: Mapping[str, Any]
    attrs: Mapping[str, Any]
    overwrite: bool
    resume_at: tuple[int, int] | None = None  # (step, epoch) to resume from


@dataclass
class Relayout:
    """The layers' parameters were re-derived (same layers, new sizes): rows queued after
    this item are unpacked with this map."""

    map: LayerMap


@dataclass
class FileAttrs:
    """Attributes to set on the run file at the next commit (e.g. at close)."""

    attrs: dict[str, Any]


@dataclass
class StepItem:
    """One recorded step: a packed float64 host tensor and how to unpack it."""

    step: int
    epoch: int
    time: float
    packed: torch.Tensor
    ready: Any  # a CUDA event to wait for, or None
    blocks: dict[str, Block]  # each measured probe's part of packed, in order
    scalar_names: list[str]
    host_scalars: dict[str, float]
    skipped: bool
    overhead: list[float]  # hooks, stats, copy (seconds)


@dataclass
class EpochItem:
    """One closed epoch: per-tensor update reductions (unpacked by probe ``probe``; none
    where ``block`` is None) and metrics, packed like a step."""

    epoch: int
    end_step: int
    time: float
    packed: torch.Tensor
    ready: Any
    metric_names: list[str]
    host_metrics: dict[str, float]
    probe: str
    block: Block | None


class NullWriter:
    """Stands in for the writer on ranks that do not write (see ``Recorder(write_rank=)``)."""

    error: BaseException | None = None
    first_nonfinite: Event | None = None
    busy_s = 0.0
    rows_written = 0
    last_commit = (0.0, 0)

    def start(self) -> None:
        """Nothing to start."""

    def put(self, item: Any) -> None:
        """Drop the item (waking a flush request at once)."""
        if isinstance(item, threading.Event):
            item.set()

    def finish(self, timeout: float | None = None) -> None:
        """Nothing to finish."""


class WriterThread(threading.Thread):
    """Consumes step and epoch items; the only thread that touches the run file."""

    def __init__(self, flush_every: int, flush_seconds: float) -> None:
        super().__init__(name="gradflow-writer", daemon=True)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.queue: queue.Queue[Any] = queue.Queue()
        self.error: BaseException | None = None
        self.first_nonfinite: Event | None = None
        self.rows_written = 0
        self.busy_s = 0.0  # seconds spent on rows and commits, file writes included
        self.last_commit = (0.0, 0)  # the last commit of step rows: (seconds, rows)
        self._write_s = 0.0  # the last file write's seconds, not yet in a row's overhead
        self._layout: RunLayout | None = None
        self._file: RunWriter | None = None
        self._stat_names: dict[str, list[str]] = {}  # per probe, those the file holds
        self._pending_steps: list[tuple[StepItem, float]] = []  # with the seconds spent on each
        self._pending_epochs: list[EpochItem] = []
        self._pending_events: list[Event] = []
        self._pending_attrs: dict[str, Any] = {}
        self._last_commit = time.monotonic()

    # -- called from the training thread ------------------------------------------------------
    def put(self, item: Any) -> None:
        if self.error is not None:
            why = reason(self.error)
            raise GradflowError(f"writing the run file failed: {why}") from self.error
        self.queue.put(item)

    def finish(self, timeout: float | None = None) -> None:
        """Write everything queued, close the file and stop the thread."""
        if self.is_alive():
            self.queue.put(None)
            self.join(timeout)

    # -- the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            while True:
                wait = max(0.01, self.flush_seconds - (time.monotonic() - self._last_commit))
                try:
                    item = self.queue.get(timeout=wait)
                except queue.Empty:
                    item = "tick"
                if item is None:
                    break
                self._handle(item)
                # Commits grow from one row, doubling up to flush_every: a killed run has
                # its first row on disk, and an overhead budget learns what the file system
                # costs per row before it spends much on rows.
                due = min(self.flush_every, max(1, 2 * self.last_commit[1]))
                if len(self._pending_steps) >= due or (
                    time.monotonic() - self._last_commit >= self.flush_seconds
                ):
                    self._commit()
            self._commit()
        except BaseException as err:  # reported to the training thread at its next call
            self.error = err
        finally:
            if self._file is not None:
                try:
                    self._file.close()
                except Exception as err:
                    self.error = self.error or err
            while True:  # never leave a producer blocked on a dead thread
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, threading.Event):  # a flush request: wake its caller
                    item.set()

    def _handle(self, item: Any) -> None:
        if isinstance(item, RunLayout):
            self._open(item)
        elif isinstance(item, StepItem):
            self._step(item)
        elif isinstance(item, EpochItem):
            self._pending_epochs.append(item)
        elif isinstance(item, Event):
            self._pending_events.append(item)
        elif isinstance(item, FileAttrs):
            self._pending_attrs.update(item.attrs)
        elif isinstance(item, Relayout):
            self._commit()  # pending rows have the previous sizes
            self._layout = dataclasses.replace(self._require_layout(), map=item.map)
        elif isinstance(item, threading.Event):  # a flush request: commit, then wake the caller
            self._commit()
            item.set()

    def _open(self, layout: RunLayout) -> None:
        self._layout = layout
        step_stats = {p: statistics.names(p) for p in layout.probes}
        if layout.resume_at is None:
            self._file = RunWriter.create(
                layout.path,
                layers=layout.layers,
                step_stats=step_stats,
                epoch_stats=list(EPOCH_STATS),
                config=layout.config,
                attrs=layout.attrs,
                overwrite=layout.overwrite,
            )
        else:
            step, epoch = layout.resume_at
            self._file = RunWriter.resume(layout.path, keep_steps_below=step, keep_epochs=epoch)
            # A resumed file keeps the statistics it was created with, whatever is
            # registered now; each of them must be computable here.
            step_stats = {p: self._file.stat_names(p) for p in layout.probes}
            unknown = [
                f"{p}/{name}" for p, names in step_stats.items() for name in names
                if f"{p}/{name}" not in statistics.STATISTICS
            ]  # fmt: skip
            if unknown:
                raise GradflowError(
                    f"{layout.path}: cannot resume: its statistic {unknown[0]} is not registered "
                    "in this process (import the module that registers it first)"
                )
        self._stat_names = step_stats

    def _step(self, item: StepItem) -> None:
        # Per row only a check for non-finite values (one vectorised test; the location
        # only when it fails): statistics are computed for many rows at once at commit
        # time, since this thread shares the training process's cores and its GIL.
        t0 = time.perf_counter()
        _wait(item.ready)
        if item.ready is not None:  # a pinned block: hand it back to torch's cache at once
            item.packed = torch.from_numpy(item.packed.numpy().copy())
        if self.first_nonfinite is None and not (
            np.isfinite(item.packed.numpy()).all()
            and math.isfinite(item.host_scalars.get("loss", 0.0))
        ):
            self._check_nonfinite(item, *_reductions(self._require_layout(), [item]))
        spent = time.perf_counter() - t0
        self.busy_s += spent
        self._pending_steps.append((item, spent))

    def _rows(self, items: list[tuple[StepItem, float]]) -> StepRows:
        """Rows of steps whose packed vectors share one layout, computed together."""
        t0 = time.perf_counter()
        layout = self._require_layout()
        steps = [item for item, _ in items]
        reductions, scalars = _reductions(layout, steps)
        shape = (len(steps), len(layout.layers))
        stats: dict[tuple[str, str], np.ndarray] = {}
        for probe in layout.probes:
            names = self._stat_names[probe]
            computed = (
                statistics.compute(probe, reductions[probe], names)
                if probe in reductions
                else {name: np.full(shape, np.nan) for name in names}
            )
            stats.update({(probe, name): v.astype(np.float32) for name, v in computed.items()})
        for name in steps[0].host_scalars:
            scalars[name] = np.array([item.host_scalars[name] for item in steps])
        nan = np.full(len(steps), np.nan)
        loss, scale = scalars.pop("loss", nan), scalars.pop("scale", nan)
        # A file write is timed after its rows are built: it counts in the next rows.
        shared = (time.perf_counter() - t0 + self._write_s) / len(steps)
        self._write_s = 0.0
        return StepRows(
            steps=np.array([item.step for item in steps], np.int64),
            epoch=np.array([item.epoch for item in steps], np.int32),
            time=np.array([item.time for item in steps]),
            loss=loss.astype(np.float32),
            scale=scale.astype(np.float32),
            skipped=np.array([item.skipped for item in steps], np.uint8),
            overhead=np.array([[*it.overhead, s + shared] for it, s in items], np.float32),
            stats=stats,
            scalars=scalars,
        )

    def _require_layout(self) -> RunLayout:
        if self._layout is None:
            raise RuntimeError("writer received data before the layout")
        return self._layout

    def _check_nonfinite(
        self,
        item: StepItem,
        reductions: Mapping[str, Mapping[str, np.ndarray]],
        scalars: Mapping[str, np.ndarray],
    ) -> None:
        """Locate the first non-finite value of one step (``reductions``: [1, L] each)."""
        if self.first_nonfinite is not None:
            return
        names = [lay.name for lay in self._require_layout().layers]
        # In the order things happen in a step (see Probe.nonfinite): the weights the
        # forward used, activations (first layer first), then gradients flowing back.
        checks = sorted(
            ((check, probe) for probe, red in reductions.items()
             for check in PROBES.get(probe).nonfinite(red)),
            key=lambda pair: pair[0].order,
        )  # fmt: skip
        for check, probe in checks:
            hits = np.flatnonzero(check.bad)
            if hits.size:
                where = int(hits[-1] if check.last_first else hits[0])
                detail = f"non-finite {check.what} in {hits.size} layer(s), first at {names[where]}"
                self._record_nonfinite(item, probe, names[where], detail)
                return
        loss = scalars["loss"][0] if "loss" in scalars else item.host_scalars.get("loss")
        if loss is not None and not math.isfinite(loss):
            self._record_nonfinite(item, "loss", "", f"loss is {loss}")

    def _record_nonfinite(self, item: StepItem, probe: str, layer: str, detail: str) -> None:
        event = Event(item.step, item.epoch, item.time, "nonfinite", probe, layer, detail)
        self.first_nonfinite = event
        self._pending_events.append(event)

    def _commit(self) -> None:
        pending = self._pending_steps or self._pending_epochs or self._pending_events
        if self._file is None or not (pending or self._pending_attrs):
            self._last_commit = time.monotonic()
            return
        t0, before = time.perf_counter(), self.rows_written
        try:
            self._write(self._file)
        finally:
            spent = time.perf_counter() - t0
            self.busy_s += spent
            self._write_s += spent
            if self.rows_written > before:
                self.last_commit = (spent, self.rows_written - before)

    def _write(self, file: RunWriter) -> None:
        if self._pending_steps:
            t0 = time.perf_counter()
            merged = _concat([self._rows(group) for group in _same_layout(self._pending_steps)])
            self._write_s -= time.perf_counter() - t0  # in the rows' overhead already
            file.append_steps(merged)
            self.rows_written += len(merged)
        layout = self._require_layout()
        for ep in self._pending_epochs:
            _wait(ep.ready)
            vec = ep.packed.numpy()
            n = ep.block.size if ep.block is not None else 0
            if ep.block is not None:
                red = PROBES.get(ep.probe).unpack(vec[:n], [ep.block], layout.map)
                computed = statistics.compute("epoch", red)
                stats = {k: computed[k] for k in EPOCH_STATS}
            else:
                stats = {k: np.full(len(layout.layers), np.nan) for k in EPOCH_STATS}
            metrics = dict(zip(ep.metric_names, vec[n:].tolist(), strict=True))
            metrics.update(ep.host_metrics)
            file.append_epoch(ep.epoch, ep.end_step, stats, metrics)
        for event in self._pending_events:
            file.add_event(event)
        file.set_attrs(self._pending_attrs)
        self._pending_attrs = {}
        self._pending_steps = []
        self._pending_epochs = []
        self._pending_events = []
        file.commit()
        self._last_commit = time.monotonic()


def _wait(ready: Any) -> None:
    """Wait for a device copy: a blocking-sync CUDA event's ``synchronize`` sleeps in the
    driver with the GIL released, so the training thread is never held up (polling would
    take the GIL thousands of times a second)."""
    if ready is not None:
        ready.synchronize()


def _same_layout(
    items: list[tuple[StepItem, float]],
) -> Iterator[list[tuple[StepItem, float]]]:
    """Runs of consecutive steps whose packed vectors have the same layout."""

    def key(item: StepItem) -> tuple[Any, ...]:
        blocks = tuple((name, block.size, block.key) for name, block in item.blocks.items())
        return (blocks, item.scalar_names, sorted(item.host_scalars))

    for _, group in itertools.groupby(items, key=lambda pair: key(pair[0])):
        yield list(group)


def _reductions(
    layout: RunLayout, items: Sequence[StepItem]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Per-layer reductions [R, L] of steps with one packed layout, and their device
    scalars [R]."""
    vec = np.stack([item.packed.numpy() for item in items])
    first = items[0]
    reductions: dict[str, dict[str, np.ndarray]] = {}
    pos = 0
    for probe, block in first.blocks.items():
        blocks = [item.blocks[probe] for item in items]
        part = vec[:, pos : pos + block.size]
        reductions[probe] = PROBES.get(probe).unpack(part, blocks, layout.map)
        pos += block.size
    scalars = {name: vec[:, pos + i] for i, name in enumerate(first.scalar_names)}
    scaled = [
        (probe, column, power)
        for probe in reductions
        for column, power in PROBES.get(probe).loss_scaled.items()
    ]
    scale = scalars.get("scale")
    if scale is None and "scale" in first.host_scalars:
        scale = np.array([item.host_scalars["scale"] for item in items])
    if scaled and scale is not None:
        # Measured from the GradScaler's scaled loss: recorded as from the loss itself,
        # divided by the scale that backward pass used (the row's).
        divisor = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)[:, None]
        for probe, column, power in scaled:
            reductions[probe][column] = reductions[probe][column] / divisor**power
    return reductions, scalars


def _concat(rows: list[StepRows]) -> StepRows:
    return StepRows(
        steps=np.concatenate([r.steps for r in rows]),
        epoch=np.concatenate([r.epoch for r in rows]),
        time=np.concatenate([r.time for r in rows]),
        loss=np.concatenate([r.loss for r in rows]),
        scale=np.concatenate([r.scale for r in rows]),
        skipped=np.concatenate([r.skipped for r in rows]),
        overhead=np.concatenate([r.overhead for r in rows]),
        stats={k: np.concatenate([r.stats[k] for r in rows]) for k in rows[0].stats},
        scalars={
            k: np.concatenate([r.scalars.get(k, np.full(len(r), np.nan)) for r in rows])
            for k in {k for r in rows for k in r.scalars}
        },
    )


__all__ = [
    "EPOCH_STATS",
    "OVERHEAD_COLUMNS",
    "EpochItem",
    "FileAttrs",
    "Relayout",
    "RunLayout",
    "StepItem",
    "WriterThread",
]
