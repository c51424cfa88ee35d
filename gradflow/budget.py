"""An overhead budget: the recorder picks which steps to record so that its own measured
cost stays within a fraction of the training's wall time.

The cost is what the run file's ``/overhead`` columns hold: the training thread's time in
hooks, statistics and copies (charged when a recorded row is handed to the writer) and the
writer thread's time (read from the writer, file writes included). Recording also costs
the training time off those clocks (torch calling the hooks, memory traffic, the writer
thread holding the GIL): the schedule times every step and, once it has seen a few
recorded and unrecorded ones, charges a row the larger of its clocks' cost and the
difference of the median wall times of recorded and unrecorded steps (its clocks' cost
scaled up by their ratio). Decisions are made before a step runs, so the cost of rows not
yet measured is estimated from those measured (a median over the last rows).

Which steps are recorded:

- *forced*: step 0; every epoch's first step (the one after :meth:`~gradflow.Recorder.epoch_end`);
  every epoch's last step: ``start + steps_per_epoch - 1`` when ``steps_per_epoch`` is
  given, else predicted from the previous epoch's length (epoch 0's last step cannot be
  predicted; the next epoch's first step, recorded anyway, follows it); the step after a
  logged ``loss`` that is non-finite or a spike (above ``spike`` times the running mean of
  the loss). Forced steps are recorded even when the credit is spent, and the credit they
  overdraw is paid back before the next optional step.
- *optional*: any other step, recorded as soon as the credit (``budget`` seconds earned per
  second of wall time, minus the measured cost, minus the estimated cost of recorded rows
  not measured yet) covers the estimated cost of one more row. The credit is spent as soon
  as it is earned and saved up to two rows at most, so the start of a run is recorded as
  densely as the budget allows and the rest evenly; when the step time or the cost per row
  changes, the spacing follows. The budget holds at every step, so a run's start cannot be
  denser than that without overdrawing it for a run that stops early.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gradflow.errors import GradflowError


class BudgetSchedule:
    """A ``step -> bool`` schedule that keeps the recorder's cost within ``budget``.

    Args:
        budget: the largest share of the wall time the recorder may spend (0 < budget < 1).
        steps_per_epoch: optimizer steps per epoch, when known (for epochs' last steps).
        spike: a logged loss above ``spike`` times its running mean forces the next step.
        clock: the time source (seconds).
    """

    def __init__(
        self,
        budget: float,
        *,
        steps_per_epoch: int | None = None,
        spike: float = 2.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
            raise GradflowError(f"budget must be a number between 0 and 1, got {budget!r}")
        if steps_per_epoch is not None and (
            isinstance(steps_per_epoch, bool)
            or not isinstance(steps_per_epoch, int)
            or steps_per_epoch < 1
        ):
            raise GradflowError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
        self.budget = float(budget)
        self.steps_per_epoch = steps_per_epoch
        self.spike = spike
        self._clock = clock
        self._t0 = clock()
        self._writer_seconds: Callable[[], tuple[float, int, tuple[float, int]]] | None = None
        self._train_s = 0.0  # training-thread cost of the rows charged so far
        self._recent: deque[float] = deque(maxlen=16)  # the last rows' training-thread costs
        # Wall seconds of the last recorded and unrecorded steps (from one decision to the next).
        self._walls: dict[bool, deque[float]] = {True: deque(maxlen=16), False: deque(maxlen=16)}
        self._last_call: float | None = None
        self._charged = 0  # rows charged
        self._credit = 0.0  # seconds the recorder may still spend
        self._seen = (self._t0, 0.0)  # the clock and the writer's seconds when last updated
        self._recorded = 0  # steps decided to be recorded
        self._forced: set[int] = {0}
        self._epoch_start = 0
        self._last_epoch_len: int | None = None
        self._loss_mean: float | None = None
        self._losses = 0
        self._pending_loss: Any = None  # a device loss copied to the host, not yet read
        self._decided: dict[int, bool] = {}

    def bind(self, writer_seconds: Callable[[], tuple[float, int, tuple[float, int]]]) -> None:
        """Read the writer's cost from ``writer_seconds() -> (seconds, rows committed,
        (seconds, rows) of the last commit of rows)`` (without it, rows cost the training
        thread's time)."""
        self._writer_seconds = writer_seconds

    def state_dict(self) -> dict[str, Any]:
        """Where the schedule stands between epochs, for a resumed run: the current epoch's
        first step, the last epoch's length and the loss's running mean (the credit and
        the cost per row are measured anew, as they depend on the process)."""
        return {
            "budget": self.budget,
            "epoch_start": self._epoch_start,
            "last_epoch_len": self._last_epoch_len,
            "loss_mean": self._loss_mean,
            "losses": self._losses,
        }

    def load_state_dict(self, state: dict[str, Any], step: int) -> None:
        """Continue from :meth:`state_dict` at ``step`` (the first step not done yet): an
        epoch starting there is forced, as it would have been without the interruption."""
        self._epoch_start = int(state["epoch_start"])
        self._last_epoch_len = state["last_epoch_len"]
        self._loss_mean = state["loss_mean"]
        self._losses = int(state["losses"])
        self._forced = {self._epoch_start} if self._epoch_start >= step else set()
        self._decided = {}
        self._recorded = 0

    # -- what the recorder reports -----------------------------------------------------------
    def charge(self, seconds: float) -> None:
        """A recorded row's training-thread cost, measured when it went to the writer
        (charged scaled by :meth:`scale`)."""
        if self._charged:  # the first row's cost includes one-time setup: not an estimate
            self._recent.append(seconds)
        self._charged += 1
        cost = seconds * self.scale()
        self._train_s += cost
        self._credit -= cost

    def scale(self) -> float:
        """How much more a recorded step costs the training than the recorder's clocks
        see: the difference of the median wall times of the last recorded and unrecorded
        steps over the median clocked cost of the last rows (1 until four of each are
        timed; at most 5, so one slow stretch cannot stop the recording)."""
        recorded, plain = self._walls[True], self._walls[False]
        if len(recorded) < 4 or len(plain) < 4 or not self._recent:
            return 1.0
        clocked = statistics.median(self._recent)
        excess = statistics.median(recorded) - statistics.median(plain)
        return min(max(excess / clocked, 1.0), 5.0) if clocked > 0 else 1.0

    def epoch_end(self, next_step: int) -> bool:
        """An epoch closed before ``next_step``: that step (the next epoch's first) is
        forced. Returns whether it was not recorded until now."""
        length = next_step - self._epoch_start
        if length > 0:
            self._last_epoch_len = length
        self._epoch_start = next_step
        self._forced.add(next_step)
        return self._force(next_step)

    def loss(self, value: Any, next_step: int) -> bool:
        """A logged loss: non-finite or a spike forces ``next_step``. Returns whether that
        step was not recorded until now. A device tensor is read once its copy to the host
        completed (no sync): its verdict may apply a step later."""
        import torch

        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            host = value.detach().to("cpu", non_blocking=True)
            ready = torch.cuda.Event() if value.device.type == "cuda" else None
            if ready is not None:
                ready.record()
            self._pending_loss = (host, ready)
            return False
        return self._judge(float(value), next_step)

    # -- the schedule ------------------------------------------------------------------------
    def __call__(self, step: int) -> bool:
        """Whether to record ``step`` (decided once, before the step runs; asked again,
        e.g. by an integration after the step, the decision stands)."""
        if step in self._decided:
            return self._decided[step]
        if self._decided and step < max(self._decided):
            return False  # decided long ago and forgotten: only the last two are kept
        now = self._clock()
        # The previous step ran since its decision (as finally taken: maybe forced); not
        # timed across an epoch's end, where validation would count as its cost.
        if self._last_call is not None and step - 1 in self._decided and step != self._epoch_start:
            self._walls[self._decided[step - 1]].append(now - self._last_call)
        self._last_call = now
        if self._pending_loss is not None:
            host, ready = self._pending_loss
            if ready is None or ready.query():
                self._pending_loss = None
                self._judge(float(host), step)
        record = step in self._forced or step == self._epoch_last() or self._affordable()
        self._decided = {s: r for s, r in self._decided.items() if s == step - 1} | {step: record}
        self._recorded += record
        return record

    def reached(self) -> float:
        """The cost so far as charged (the writer's seconds, the training thread's scaled
        by :meth:`scale`) as a share of the wall time since the start."""
        writer_s, _, _ = self._writer()
        wall = self._clock() - self._t0
        return (self._train_s + writer_s) / wall if wall > 0 else 0.0

    # -- internals ---------------------------------------------------------------------------
    def _affordable(self) -> bool:
        if self._charged == 0:
            return False  # the first row is not measured yet
        now = self._clock()
        writer_s, writer_rows, last_commit = self._writer()
        then, writer_then = self._seen
        self._seen = (now, writer_s)
        self._credit += self.budget * (now - then) - (writer_s - writer_then)
        if not self._recent:  # nothing to estimate from: one more row once the debt is paid
            return self._recorded == self._charged and self._credit >= 0
        # A median: one slow row (the first, a garbage collection) does not set the pace.
        per_train = statistics.median(self._recent) * self.scale()
        waiting = max(self._recorded - writer_rows, 0)  # rows the writer has not committed
        commit = functools.partial(self._commit, last=last_commit, per_train=per_train)
        owed = (self._recorded - self._charged) * per_train + commit(waiting)
        row = per_train + commit(waiting + 1) - commit(waiting)
        # Credit is not saved up beyond two rows: time the training spends elsewhere
        # (validation, a pause) does not pay for a burst of rows afterwards.
        self._credit = min(self._credit, owed + 2 * row)
        return self._credit - owed >= row

    def _commit(self, rows: int, last: tuple[float, int], per_train: float) -> float:
        """The estimated writer's cost of committing ``rows`` rows: as the last commit of
        rows cost, scaled up where more rows wait than it held. A commit costs mostly a
        fixed amount on a fast file system and per row on a slow one; scaling only up
        overestimates the first case until commits with more rows show the lower cost,
        where the opposite would overdraw the budget in the second."""
        if self._writer_seconds is None or rows == 0:
            return 0.0
        seconds, committed = last
        if committed == 0:  # nothing committed yet (the writer commits the first row at once)
            return rows * per_train
        return seconds * max(1.0, rows / committed)

    def _writer(self) -> tuple[float, int, tuple[float, int]]:
        return (0.0, 0, (0.0, 0)) if self._writer_seconds is None else self._writer_seconds()

    def _epoch_last(self) -> int | None:
        length = self.steps_per_epoch or self._last_epoch_len
        return self._epoch_start + length - 1 if length else None

    def _judge(self, loss: float, next_step: int) -> bool:
        spike = (
            self._loss_mean is not None
            and self._losses >= 5
            and self._loss_mean > 0
            and loss > self.spike * self._loss_mean
        )
        if math.isfinite(loss):
            self._losses += 1
            mean = self._loss_mean if self._loss_mean is not None else loss
            self._loss_mean = mean + (loss - mean) / min(self._losses, 20)
        if not math.isfinite(loss) or spike:
            self._forced.add(next_step)
            return self._force(next_step)
        return False

    def _force(self, step: int) -> bool:
        """Turn an already decided ``step`` into a recorded one."""
        if self._decided.get(step) is False:
            self._decided[step] = True
            self._recorded += 1
            return True
        return False


__all__ = ["BudgetSchedule"]
