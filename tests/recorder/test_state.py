"""Resuming through ``Recorder.state_dict()`` / ``load_state_dict()``: a run stopped after a
checkpoint (model, optimizer and recorder state saved with ``torch.save``) and continued in
a fresh Recorder writes the same run file as one never stopped, computed in the same test
with the same seed (rtol 1e-6: the same float32 operations on CPU in the same order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradflowError, Recorder, open_run

STEPS_PER_EPOCH, EPOCHS = 4, 3
PROBES = ("param", "activation", "grad_output")


def build() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def train(
    rec: Recorder, model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int
) -> None:
    """Optimizer steps ``start`` to ``stop - 1``, closing each epoch at its end."""
    for step in range(start, stop):
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        rec.log(loss=loss)
        if (step + 1) % STEPS_PER_EPOCH == 0:
            rec.epoch_end(val_loss=float(step))


def assert_same_run(resumed: Path, straight: Path) -> None:
    with open_run(resumed) as a, open_run(straight) as b:
        np.testing.assert_array_equal(a.steps, np.arange(STEPS_PER_EPOCH * EPOCHS))
        np.testing.assert_array_equal(a.steps, b.steps)
        np.testing.assert_array_equal(a.epoch, b.epoch)
        np.testing.assert_array_equal(a.epochs, np.arange(EPOCHS))
        np.testing.assert_array_equal(a.epoch_end_step, b.epoch_end_step)
        assert a.probes() == b.probes()
        for probe, names in b.probes().items():
            for name in names:
                np.testing.assert_allclose(
                    a.stat(probe, name), b.stat(probe, name), rtol=1e-6, err_msg=name
                )
        for name in b.epoch_stats():
            np.testing.assert_allclose(
                a.stat("epoch", name), b.stat("epoch", name), rtol=1e-6, err_msg=name
            )
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
        np.testing.assert_allclose(a.metrics["val_loss"], b.metrics["val_loss"])


def test_state_dict_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    total = STEPS_PER_EPOCH * EPOCHS
    model, opt = build()
    with Recorder(model, opt, tmp_path / "straight.h5", probes=PROBES) as rec:
        train(rec, model, opt, 0, total)

    saved_at = STEPS_PER_EPOCH  # a checkpoint at the end of epoch 0
    path = tmp_path / "run.h5"
    model, opt = build()
    rec = Recorder(model, opt, path, probes=PROBES)
    train(rec, model, opt, 0, saved_at)
    state = rec.state_dict()
    assert state["step"] == saved_at and state["epoch"] == 1
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "recorder": state},
        tmp_path / "ckpt.pt",
    )
    train(rec, model, opt, saved_at, saved_at + 3)  # rows after the checkpoint: dropped
    rec.close()
    with open_run(path) as run:
        assert run.steps[-1] == saved_at + 2

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model, opt = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    with Recorder(model, opt, path, probes=PROBES) as rec:
        rec.load_state_dict(ckpt["recorder"])
        train(rec, model, opt, saved_at, total)
    assert_same_run(path, tmp_path / "straight.h5")
    with open_run(path) as run:
        assert [(e.kind, e.step, e.epoch) for e in run.events] == [("resume", saved_at, 1)]


def test_state_dict_mid_epoch_keeps_the_step_rows(tmp_path: Path) -> None:
    """Saved within an epoch: the steps and their statistics continue exactly; that
    epoch's update is measured from the resume on (float64 reference)."""
    model, opt = build()
    with Recorder(model, opt, tmp_path / "straight.h5", every=2) as rec:
        train(rec, model, opt, 0, 8)
    model, opt = build()
    with Recorder(model, opt, tmp_path / "run.h5", every=2) as rec:
        train(rec, model, opt, 0, 5)
        state = rec.state_dict()
        params = [p.detach().clone() for p in model.parameters()]
    assert (state["step"], state["epoch"]) == (5, 1)
    opt_state = opt.state_dict()
    model, opt = build()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), params, strict=True):
            p.copy_(saved)
    opt.load_state_dict(opt_state)
    with Recorder(model, opt, tmp_path / "run.h5", every=2) as rec:
        rec.load_state_dict(state)
        train(rec, model, opt, 5, 8)
    first = [
        (p.detach().double() - saved.double()).pow(2).sum()
        for p, saved in zip(list(model.parameters())[:2], params[:2], strict=True)
    ]
    with open_run(tmp_path / "run.h5") as a, open_run(tmp_path / "straight.h5") as b:
        np.testing.assert_array_equal(a.steps, [0, 2, 4, 6])
        np.testing.assert_array_equal(a.steps, b.steps)
        np.testing.assert_array_equal(a.epoch, b.epoch)
        for name in b.probes()["param"]:
            np.testing.assert_allclose(
                a.stat("param", name), b.stat("param", name), rtol=1e-6, err_msg=name
            )
        np.testing.assert_array_equal(a.epochs, [0, 1])
        assert a.stat("epoch", "update_norm")[1, 0] == pytest.approx(
            float(sum(first)) ** 0.5, rel=1e-5
        )


def saved_state(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    model, opt = build()
    with Recorder(model, opt, tmp_path / "run.h5", overwrite=True, **kwargs) as rec:
        train(rec, model, opt, 0, 2)
        return rec.state_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: [1, 2], "must be a dict, got list"),
        (lambda s: {k: v for k, v in s.items() if k != "step"}, "no 'step' in it"),
        (lambda s: {**s, "version": 99}, "state version 99"),
        (lambda s: {**s, "step": -1}, "integers >= 0"),
        (lambda s: {**s, "path": "/elsewhere/other.h5"}, "is of run file /elsewhere/other.h5"),
    ],
)
def test_a_bad_state_is_refused_in_one_line(tmp_path: Path, change: Any, message: str) -> None:
    state = saved_state(tmp_path)
    model, opt = build()
    with Recorder(model, opt, tmp_path / "run.h5") as rec:
        with pytest.raises(GradflowError, match=message) as err:
            rec.load_state_dict(change(state))
        assert "\n" not in str(err.value)
        rec.load_state_dict(state)  # still possible after a refused one


def test_the_state_of_a_missing_run_file_is_refused_and_nothing_resumes(tmp_path: Path) -> None:
    state = saved_state(tmp_path)
    (tmp_path / "run.h5").unlink()
    model, opt = build()
    with Recorder(model, opt, tmp_path / "run.h5") as rec:
        with pytest.raises(GradflowError, match=r"run\.h5: cannot resume, no such run file$"):
            rec.load_state_dict(state)
        assert (rec.step, rec.epoch) == (0, 0)
        train(rec, model, opt, 0, 1)  # a new run file, from step 0
    with open_run(tmp_path / "run.h5") as run:
        assert run.steps.tolist() == [0] and run.events == []


def test_a_state_needs_the_same_kind_of_schedule_and_an_unstarted_recorder(
    tmp_path: Path,
) -> None:
    state = saved_state(tmp_path)
    model, opt = build()
    budget_state = saved_state(tmp_path, budget=0.5)
    assert budget_state["budget"]["epoch_start"] == 0
    with Recorder(model, opt, tmp_path / "run.h5", budget=0.5) as rec:
        with pytest.raises(GradflowError, match="saved without a budget"):
            rec.load_state_dict(state)
        with pytest.raises(GradflowError, match="no 'epoch_start' in its budget"):
            rec.load_state_dict({**budget_state, "budget": {"budget": 0.5}})
        rec.load_state_dict(budget_state)
    model, opt = build()
    with Recorder(model, opt, tmp_path / "run.h5", overwrite=True) as rec:
        train(rec, model, opt, 0, 1)
        with pytest.raises(GradflowError, match="before the model's first step"):
            rec.load_state_dict(state)


def test_a_budget_schedule_continues_from_its_state(tmp_path: Path) -> None:
    """A budget too small for optional rows records only the forced ones (each epoch's
    first and last step); after a resume at an epoch's end the next epoch's first step is
    still forced, as without the interruption."""
    from gradflow.budget import BudgetSchedule

    def budget() -> BudgetSchedule:
        return BudgetSchedule(1e-9, steps_per_epoch=STEPS_PER_EPOCH)

    total = STEPS_PER_EPOCH * EPOCHS
    model, opt = build()
    with Recorder(model, opt, tmp_path / "straight.h5", budget=budget()) as rec:
        train(rec, model, opt, 0, total)
    model, opt = build()
    with Recorder(model, opt, tmp_path / "run.h5", budget=budget()) as rec:
        train(rec, model, opt, 0, STEPS_PER_EPOCH)
        state = rec.state_dict()
    assert state["budget"]["epoch_start"] == STEPS_PER_EPOCH
    with Recorder(model, opt, tmp_path / "run.h5", budget=budget()) as rec:
        rec.load_state_dict(state)
        train(rec, model, opt, STEPS_PER_EPOCH, total)
    forced = [0, 3, 4, 7, 8, 11]
    with open_run(tmp_path / "run.h5") as a, open_run(tmp_path / "straight.h5") as b:
        np.testing.assert_array_equal(b.steps, forced)
        np.testing.assert_array_equal(a.steps, forced)
