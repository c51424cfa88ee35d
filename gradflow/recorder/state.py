"""A Recorder's state for resuming: a small plain dict that ``torch.save`` stores inside a
training checkpoint (:meth:`Recorder.state_dict <gradflow.recorder.Recorder.state_dict>`),
and its checks when a new Recorder continues from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gradflow.budget import BudgetSchedule
from gradflow.errors import GradflowError
from gradflow.recorder.base import RecorderBase
from gradflow.recorder.rows import RowPhase

STATE_VERSION = 1
_KEYS = ("version", "path", "step", "epoch", "budget")


def recorder_state(
    path: Path, step: int, epoch: int, budget: BudgetSchedule | None
) -> dict[str, Any]:
    """The state of a Recorder writing ``path`` whose next step is ``step`` in ``epoch``.

    Args:
        path: its run file.
        step: the first optimizer step not done yet.
        epoch: the current epoch.
        budget: its budget schedule, if it has one.

    Returns:
        ``{"version", "path", "step", "epoch", "budget"}``, plain values only.
    """
    return {
        "version": STATE_VERSION,
        "path": str(path.resolve()),
        "step": step,
        "epoch": epoch,
        "budget": budget.state_dict() if budget is not None else None,
    }


def checked_state(
    state: Any, path: Path, budget: BudgetSchedule | None
) -> tuple[int, int, dict[str, Any] | None]:
    """``(step, epoch, budget state)`` of ``state``, refused in one line where it is not a
    state of a Recorder writing ``path`` with a budget where (and only where) this one has.

    Args:
        state: what :func:`recorder_state` returned (e.g. read back by ``torch.load``).
        path: the run file of the Recorder continuing from it.
        budget: its budget schedule, if it has one.

    Returns:
        The step and epoch to continue from, and the budget schedule's state or None.
    """
    if not isinstance(state, dict):
        raise GradflowError(f"a Recorder state must be a dict, got {type(state).__name__}")
    missing = [key for key in _KEYS if key not in state]
    if missing:
        raise GradflowError(f"not a Recorder state: no {missing[0]!r} in it")
    if state["version"] != STATE_VERSION:
        raise GradflowError(
            f"Recorder state version {state['version']!r} is not {STATE_VERSION} "
            "(saved by another gradflow version)"
        )
    step, epoch = state["step"], state["epoch"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step, epoch)):
        raise GradflowError(
            f"Recorder state: step and epoch must be integers >= 0, got {step!r}, {epoch!r}"
        )
    if not isinstance(state["path"], str) or Path(state["path"]) != path.resolve():
        raise GradflowError(
            f"the Recorder state is of run file {state['path']}, not of {path.resolve()}"
        )
    saved = state["budget"]
    if (saved is None) != (budget is None) or not (saved is None or isinstance(saved, dict)):
        raise GradflowError(
            "the Recorder state was saved "
            + ("without" if saved is None else "with")
            + " a budget; give the Recorder the same every= or budget= as the saved one"
        )
    if budget is not None and saved is not None:
        missing = sorted(set(budget.state_dict()) - set(saved))
        if missing:
            raise GradflowError(f"not a Recorder state: no {missing[0]!r} in its budget")
    return step, epoch, saved


class StateMixin(RecorderBase):
    """Saving a Recorder's state and continuing a run file from it."""

    def state_dict(self) -> dict[str, Any]:
        """The recorder's state, to save with the model and optimizer in a checkpoint
        (``torch.save`` stores it; ``torch.load(..., weights_only=True)`` reads it back).

        It closes the current row (call it after the step's :meth:`log`) and blocks until
        every row is committed to the run file, so that the file holds what the state says.

        Returns:
            A small plain dict: format version, run file path, next step, epoch, and the
            budget schedule's position where there is one.
        """
        if self._closed:
            raise GradflowError("state_dict() on a closed Recorder")
        if not self._inert:
            self._ensure_layout()
            self._end_row()
            self._wait_for_writer("saving the state")
        return recorder_state(self.path, self.step, self.epoch, self._budget)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run file of ``state`` (from :meth:`state_dict`) instead of creating
        one: rows from its step on and epochs from its epoch on are dropped, a ``resume``
        event is added, and recording goes on from there. Call it before the first step.

        Args:
            state: the state saved by a Recorder writing the same ``path``.
        """
        if self._closed:
            raise GradflowError("load_state_dict() on a closed Recorder")
        if self._layout_sent or self.step or self.epoch or self._rows.phase is not RowPhase.IDLE:
            raise GradflowError("load_state_dict() must come before the model's first step")
        step, epoch, budget_state = checked_state(state, self.path, self._budget)
        if self._writes and not self.path.exists():
            raise GradflowError(f"{self.path}: cannot resume, no such run file")
        if self._budget is not None and budget_state is not None:
            self._budget.load_state_dict(budget_state, step)
        self._resume = (step, epoch)
        self.step, self.epoch = step, epoch
        self._active = self.schedule(step)
