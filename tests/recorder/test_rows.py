"""The row state machine (:class:`gradflow.recorder.rows.RowState`), transition by
transition, without a model: which phase each call leads to, when a row is complete, and
where logged scalars go."""

from __future__ import annotations

import pytest
import torch

from gradflow.probes import CallLog
from gradflow.recorder.rows import MeasuredRow, RowPhase, RowState


def _row(step: int = 0) -> MeasuredRow:
    return MeasuredRow(
        step=step, epoch=0, time=0.0, packed={}, log=CallLog(), scalars={}, skipped=False
    )


def test_one_optimizer_goes_idle_stepping_closed_idle() -> None:
    rows = RowState()
    assert rows.phase is RowPhase.IDLE and rows.take() is None
    rows.step(0)
    assert rows.phase is RowPhase.STEPPING and rows.has_stepped(0) and not rows.has_stepped(1)
    assert rows.complete(1)
    row = _row(7)
    rows.close(row)
    assert rows.phase is RowPhase.CLOSED
    assert rows.take() is row
    assert rows.phase is RowPhase.IDLE and rows.take() is None


def test_unrecorded_step_closes_to_idle() -> None:
    rows = RowState()
    rows.step(0)
    rows.close(None)
    assert rows.phase is RowPhase.IDLE and not rows.stepped


def test_row_completes_once_every_optimizer_stepped() -> None:
    rows = RowState()
    assert not rows.complete(0)
    rows.step(0)  # without an optimizer a backward pass is a row: one "step" of index 0
    assert rows.complete(0)
    rows = RowState()
    rows.step(1)
    assert not rows.complete(3)
    rows.step(1)  # the same optimizer again does not count twice
    assert not rows.complete(3)
    rows.step(0)
    rows.step(2)
    assert rows.complete(3)


def test_split_steps_count_towards_the_next_row() -> None:
    rows = RowState()
    rows.step(0)
    rows.step(1)
    rows.close(_row(), split=2)
    assert rows.take() is not None
    assert rows.split_steps == 2 and rows.phase is RowPhase.IDLE
    rows.step(2)
    assert rows.complete(3) and not rows.complete(4)
    rows.close(_row())
    assert rows.split_steps == 0


def test_close_resets_the_row_flags_but_not_the_sticky_ones() -> None:
    rows = RowState()
    rows.step(0)
    rows.skipped = rows.root_trained = rows.layer_called = rows.dirty = True
    rows.scalars["loss"] = [1.0]
    rows.close(_row())
    assert not rows.skipped and not rows.root_trained and rows.scalars == {}
    assert rows.layer_called and rows.dirty  # about the model, not the row


def test_logged_scalars_go_to_the_closed_row_while_it_waits() -> None:
    rows = RowState()
    rows.log({"a": 1.0}, recorded=False)
    assert rows.scalars == {}  # an unrecorded step keeps nothing
    rows.log({"a": 1.0}, recorded=True)
    rows.step(0)
    rows.log({"b": 2.0}, recorded=True)
    measured = _row()
    measured.scalars = rows.scalars
    rows.close(measured)
    rows.log({"c": torch.tensor(3.0)}, recorded=False)  # after step(): still this row's
    assert set(measured.scalars) == {"a", "b", "c"}
    assert rows.scalars == {}
    assert rows.take() is measured
    rows.log({"d": 4.0}, recorded=True)
    assert rows.scalars == {"d": [4.0]} and set(measured.scalars) == {"a", "b", "c"}


def test_replay_nests_and_unwinds_on_error() -> None:
    rows = RowState()
    with rows.replay():
        assert rows.replaying == 1
        with rows.replay():
            assert rows.replaying == 2
    assert rows.replaying == 0
    with pytest.raises(RuntimeError), rows.replay():
        raise RuntimeError("closure failed")
    assert rows.replaying == 0


def test_a_step_while_a_row_waits_is_refused() -> None:
    rows = RowState()
    rows.step(0)
    rows.close(_row())
    with pytest.raises(AssertionError, match="hand the closed row over first"):
        rows.step(0)


def test_a_scalar_logged_several_times_in_a_row_is_their_mean() -> None:
    rows = RowState()
    rows.step(0)
    for value in (1.0, 2.0, 6.0):  # one per micro-batch
        rows.log({"loss": value}, recorded=True)
    measured = _row()
    measured.scalars = rows.scalars
    rows.close(measured)
    rows.log({"loss": torch.tensor(3.0), "lr": 0.5}, recorded=False)  # after step()
    means = measured.scalar_means()
    assert float(means["loss"]) == (1.0 + 2.0 + 6.0 + 3.0) / 4 and means["lr"] == 0.5
