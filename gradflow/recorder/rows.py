"""Where the recorder stands between two rows of the run file.

A row is one optimizer step (or, with several optimizers, one step of each; without an
optimizer, one backward pass). While it is measured, the optimizers that stepped in it are
counted; once every one has, it closes, and waits, measured, until the next forward or
step hands it to the writer (so that scalars logged after ``optimizer.step()`` still land
in it). :class:`RowState` holds that bookkeeping and the flags the hooks set on the way;
the :class:`~gradflow.recorder.Recorder` drives it and does the measuring.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gradflow.probes import Block, CallLog


class RowPhase(enum.Enum):
    """The states of :class:`RowState`."""

    IDLE = "idle"  # no optimizer stepped since the last row closed; no closed row waits
    STEPPING = "stepping"  # some optimizers stepped in the row being measured, not all yet
    CLOSED = "closed"  # a measured row waits to be handed to the writer


@dataclass
class MeasuredRow:
    """A closed row, measured, not yet handed to the writer."""

    step: int
    epoch: int
    time: float
    packed: dict[str, tuple[torch.Tensor, Block]]  # the step probes' reductions, by probe
    log: CallLog  # the layer calls of the row (merged, or reduced across ranks)
    scalars: dict[str, list[Any]]  # logged values by name, added to until handed over
    skipped: bool

    def scalar_means(self) -> dict[str, Any]:
        """Each logged scalar's mean over the values logged in the row (a tensor where
        any value is one: no sync)."""
        return {name: sum(values) / len(values) for name, values in self.scalars.items()}


class RowState:
    """The row being measured: which optimizers stepped in it, the closed row waiting for
    the writer, the scalars logged for the next row, and the flags the hooks set.

    Transitions: :meth:`step` (IDLE -> STEPPING, STEPPING -> STEPPING), :meth:`close`
    (STEPPING -> CLOSED, or IDLE on an unrecorded step), :meth:`take` (CLOSED -> IDLE).
    """

    def __init__(self) -> None:
        self.stepped: set[int] = set()  # optimizers that stepped in the row being measured
        self.split_steps = 0  # optimizers that stepped in the row split off this one
        self.skipped = False  # the grad scaler skipped a step of the row
        self.replaying = 0  # inside a second or later call of a step's closure
        self.root_trained = False  # a training forward of the model ran in the recorded row
        self.layer_called = False  # a layer's forward hook ran on a recorded step
        self.dirty = False  # a submodule or parameter of the model was (re)registered
        self.scalars: dict[str, list[Any]] = {}  # logged for the row being measured
        self.closed: MeasuredRow | None = None

    @property
    def phase(self) -> RowPhase:
        """The current state."""
        if self.stepped:
            return RowPhase.STEPPING
        return RowPhase.IDLE if self.closed is None else RowPhase.CLOSED

    def step(self, index: int) -> None:
        """Optimizer ``index`` steps in the row being measured (a closed row must have been
        :meth:`take`-n first)."""
        assert self.closed is None, "hand the closed row over first"
        self.stepped.add(index)

    def has_stepped(self, index: int) -> bool:
        """Whether optimizer ``index`` already stepped in the row being measured."""
        return index in self.stepped

    def complete(self, n_optimizers: int) -> bool:
        """Whether every one of ``n_optimizers`` (at least one) stepped in the row."""
        return len(self.stepped) + self.split_steps >= max(1, n_optimizers)

    def close(self, row: MeasuredRow | None, *, split: int = 0) -> None:
        """Close the row being measured: ``row`` (None when the step was not recorded)
        waits for the writer; ``split`` optimizers that stepped in it count towards the
        next row (a row split off when the parameters changed between optimizers)."""
        if row is not None:
            self.closed = row
        self.stepped = set()
        self.split_steps = split
        self.skipped = False
        self.root_trained = False
        self.scalars = {}

    def take(self) -> MeasuredRow | None:
        """The closed row, handed over (None when none waits)."""
        row, self.closed = self.closed, None
        return row

    def log(self, values: dict[str, Any], *, recorded: bool) -> None:
        """Scalars logged now: those of the closed row while it waits, else those of the
        row being measured if it is ``recorded``. A name logged several times in a row
        (one loss per micro-batch) keeps every value; the row stores their mean."""
        if self.phase is RowPhase.CLOSED:
            assert self.closed is not None
            target = self.closed.scalars
        elif recorded:
            target = self.scalars
        else:
            return
        for name, value in values.items():
            target.setdefault(name, []).append(value)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """A second or later call of a step's closure (its layer calls do not count)."""
        self.replaying += 1
        try:
            yield
        finally:
            self.replaying -= 1
