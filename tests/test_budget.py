"""The overhead budget (gradflow.budget): forced steps worked out by hand, the controller on a
simulated clock, and the Recorder under a budget on real training (step time changing mid-run,
a slowed writer), against the cost stored in the run file; irregular steps in heat maps."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradflowError, Recorder, open_run
from gradflow.budget import BudgetSchedule
from gradflow.plots.heatmap import gradient_heatmap
from gradflow.runfile.write import RunWriter
from gradflow.schedule import at


class Clock:
    """A hand-driven clock (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(
    schedule: BudgetSchedule,
    clock: Clock,
    steps: range,
    step_s: float,
    row_s: float,
    clocked_s: float | None = None,
) -> list[int]:
    """Steps of ``step_s`` seconds; a recorded one costs ``row_s`` more, of which the
    recorder's clocks see ``clocked_s`` (all of it by default), charged at once."""
    chosen = []
    for step in steps:
        clock.now += step_s
        if schedule(step):
            chosen.append(step)
            clock.now += row_s
            schedule.charge(row_s if clocked_s is None else clocked_s)
    return chosen


def test_the_controller_spends_the_budget_evenly_and_follows_the_step_time() -> None:
    clock = Clock()
    budget = BudgetSchedule(0.05, clock=clock)
    # A row costs 2 ms on a 10 ms step: a 5 % budget affords a share f of the steps with
    # f * 2 = 0.05 * (10 + f * 2), f = 0.263 (the first row is twice as dear: setup).
    first = simulate(budget, clock, range(1), 0.010, 0.004)
    fast = simulate(budget, clock, range(1, 2001), 0.010, 0.002)
    slow = simulate(budget, clock, range(2001, 4001), 0.020, 0.002)  # steps twice as long
    assert first == [0]
    assert len(fast) / 2000 == pytest.approx(0.05 * 0.010 / (0.002 * 0.95), rel=0.02)
    assert len(slow) / 2000 == pytest.approx(0.05 * 0.020 / (0.002 * 0.95), rel=0.02)
    gaps = np.diff(fast[10:])
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    spent = 0.004 + 0.002 * (len(fast) + len(slow))
    assert spent <= 0.05 * clock.now + 0.002  # within the budget plus one row


def test_a_row_costs_what_recorded_steps_take_longer_where_the_clocks_see_less() -> None:
    # A recorded step takes 6 ms longer, of which the recorder's clocks see 2 ms (the rest:
    # hook dispatch, memory traffic). Charged at its clocks' cost the budget would afford
    # f * 6 = 0.05 * (10 + f * 6) -> 8.8 % of the steps at 2.6x the budget's real spend.
    clock = Clock()
    budget = BudgetSchedule(0.05, clock=clock)
    chosen = simulate(budget, clock, range(3000), 0.010, 0.006, clocked_s=0.002)
    assert budget.scale() == pytest.approx(3.0)
    spent = 0.006 * len(chosen)
    # Within the budget, but for what the clocks missed of the rows before the scale was
    # known (four recorded steps timed, and the first row's charge).
    assert spent <= 0.05 * clock.now + 5 * 0.004
    assert len(chosen) / 3000 == pytest.approx(0.05 * 0.010 / (0.006 * 0.95), rel=0.05)
    assert budget.reached() == pytest.approx(spent / clock.now, rel=0.05)


def test_the_scale_is_one_until_steps_are_timed_and_never_below_one() -> None:
    clock = Clock()
    budget = BudgetSchedule(0.05, clock=clock)
    assert budget.scale() == 1.0
    # Recorded steps no slower than unrecorded ones (a noisy machine): the clocks' cost stands.
    chosen = simulate(budget, clock, range(400), 0.010, 0.0)
    budget.charge(0.001)
    assert len(chosen) > 8 and budget.scale() == 1.0


def test_the_time_between_epochs_is_not_a_recorded_step_s_cost() -> None:
    # Epochs of 20 steps; 0.5 s of validation after each epoch's last step (recorded: forced).
    clock = Clock()
    budget = BudgetSchedule(0.05, steps_per_epoch=20, clock=clock)
    for step in range(200):
        clock.now += 0.010
        if budget(step):
            clock.now += 0.002
            budget.charge(0.002)
        if (step + 1) % 20 == 0:
            clock.now += 0.5
            budget.epoch_end(step + 1)
    assert budget.scale() == pytest.approx(1.0)


def test_credit_is_not_saved_up_over_a_pause() -> None:
    clock = Clock()
    budget = BudgetSchedule(0.1, clock=clock)
    # f * 5 = 0.1 * (10 + f * 5): 22 % of the steps.
    simulate(budget, clock, range(100), 0.010, 0.005)
    clock.now += 60.0  # a long validation pass: 6 s of credit, not spent on a burst
    after = simulate(budget, clock, range(100, 110), 0.010, 0.005)
    assert len(after) <= 2 + 3  # two rows saved up, then the usual pace


def test_forced_steps_are_epoch_ends_and_the_step_after_a_bad_loss() -> None:
    clock = Clock()
    budget = BudgetSchedule(0.001, steps_per_epoch=10, clock=clock)  # nothing optional
    chosen = []
    for step in range(40):
        clock.now += 0.01
        if budget(step):
            chosen.append(step)
            budget.charge(0.01)
        loss = math.nan if step == 13 else (100.0 if step == 27 else 1.0)
        budget.loss(loss, step + 1)
        if (step + 1) % 10 == 0:
            budget.epoch_end(step + 1)
    # 0 and 9: first and last of epoch 0; then 10, 19, 20, 29, 30, 39; 14 after the NaN,
    # 28 after the spike.
    assert chosen == [0, 9, 10, 14, 19, 20, 28, 29, 30, 39]


def test_asking_again_for_the_step_that_just_ran_changes_nothing() -> None:
    # The Lightning, ignite and transformers integrations ask the schedule whether the step
    # that just ran was recorded: the answer is the decision taken, and the next epoch's
    # first step is still forced (it was not before: the question re-decided the step).
    def run(ask_again: bool) -> tuple[list[int], list[bool]]:
        clock = Clock()
        budget = BudgetSchedule(0.001, steps_per_epoch=10, clock=clock)
        chosen, answers = [], []
        record = budget(0)
        for step in range(30):
            clock.now += 0.01
            if record:
                chosen.append(step)
                budget.charge(0.01)
            record = budget(step + 1)  # decided as this step's row closes (the Recorder)
            if ask_again:
                answers.append(budget(step))
            if (step + 1) % 10 == 0:
                record |= budget.epoch_end(step + 1)
        return chosen, answers

    plain, _ = run(ask_again=False)
    chosen, answers = run(ask_again=True)
    assert plain == chosen == [0, 9, 10, 19, 20, 29]
    assert [s for s, on in enumerate(answers) if on] == chosen


def test_without_steps_per_epoch_the_last_step_is_predicted_from_the_previous_epoch() -> None:
    clock = Clock()
    budget = BudgetSchedule(0.001, clock=clock)
    chosen = []
    for step in range(24):
        clock.now += 0.01
        if budget(step):
            chosen.append(step)
            budget.charge(0.01)
        if step + 1 in (8, 16, 24):
            budget.epoch_end(step + 1)
    assert chosen == [0, 8, 15, 16, 23]  # epoch 0's last (7) cannot be known in advance


def test_an_epoch_end_turns_the_already_decided_next_step_on() -> None:
    budget = BudgetSchedule(0.001, clock=Clock())
    assert budget(0) and not budget(1)
    assert budget.epoch_end(1)  # step 1 was decided off: now on
    assert budget(1)
    assert not budget.epoch_end(1)  # already on


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, True, "0.1", math.nan])
def test_bad_budgets_are_refused(bad: object) -> None:
    with pytest.raises(GradflowError, match="budget must be a number between 0 and 1"):
        BudgetSchedule(bad)  # type: ignore[arg-type]


def test_every_and_budget_exclude_each_other(tmp_path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(GradflowError, match="every and budget exclude each other"):
        Recorder(model, None, tmp_path / "r.h5", every=2, budget=0.1)


# -- the Recorder under a budget -----------------------------------------------------------
def train(path, budget: float, steps: int, heavy_from: int | None = None) -> float:
    """A small MLP; from ``heavy_from`` on each step also runs an extra matmul loop.
    Returns the wall time of the recorded training."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 32)
    big = torch.randn(96, 96)
    t0 = time.perf_counter()
    with Recorder(
        model,
        opt,
        path,
        budget=budget,
        probes=("param", "activation", "grad_output"),
        flush_seconds=1.0,
    ) as rec:
        for step in range(steps):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            for _ in range(8 if heavy_from is not None and step >= heavy_from else 2):
                torch.mm(big, big)
            rec.log(loss=loss)
    return time.perf_counter() - t0


def cost_share(path, wall: float) -> tuple[float, float]:
    """The recorder's cost stored in the run file over ``wall``, and one row's worst cost."""
    run = open_run(path)
    rows = run._series("overhead").sum(axis=1)
    return float(rows.sum()) / wall, float(rows.max()) / wall


@pytest.mark.slow
def test_budget_holds_when_the_step_time_changes_midway(tmp_path) -> None:
    # Long enough (several seconds) for the steady state to outweigh the fixed costs of
    # the first commits and of closing the file.
    steps = 3000
    wall = train(tmp_path / "r.h5", 0.1, steps, heavy_from=steps // 2)
    share, noise = cost_share(tmp_path / "r.h5", wall)
    assert share <= 0.1 + noise
    run = open_run(tmp_path / "r.h5")
    assert run.attrs["budget"] == 0.1
    # The recorder's own view also holds the last commit, which no row's overhead holds.
    assert 0 < run.attrs["budget_reached"] <= 0.1 + 2 * noise
    recorded = run.steps
    # Both halves recorded (how many depends on the machine: a commit costs 10-200 ms).
    assert np.any(recorded < steps // 2) and np.any(recorded >= steps // 2)
    assert len(recorded) < 0.5 * steps


SLOW_ROW = 0.01


@pytest.mark.slow
def test_budget_holds_with_a_slow_writer(tmp_path, monkeypatch) -> None:
    steps = 3000
    wall = train(tmp_path / "fast.h5", 0.1, steps)
    fast = open_run(tmp_path / "fast.h5").n_steps
    append = RunWriter.append_steps

    def slow_append(self, rows):  # type: ignore[no-untyped-def]
        time.sleep(SLOW_ROW * len(rows.steps))
        append(self, rows)

    monkeypatch.setattr(RunWriter, "append_steps", slow_append)
    wall = train(tmp_path / "slow.h5", 0.1, steps)
    slow = open_run(tmp_path / "slow.h5").n_steps
    share, noise = cost_share(tmp_path / "slow.h5", wall)
    # The last file write is timed after its rows were written: one more row's sleep.
    assert share <= 0.1 + noise + SLOW_ROW / wall
    assert slow < fast


def test_recorder_forces_epoch_ends_and_the_step_after_a_nonfinite_loss(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4)
    schedule = BudgetSchedule(1e-6, steps_per_epoch=6)
    with Recorder(model, opt, tmp_path / "r.h5", budget=schedule) as rec:
        for epoch in range(3):
            for i in range(6):
                opt.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                opt.step()
                rec.log(loss=math.nan if (epoch, i) == (1, 2) else loss)
            rec.epoch_end()
    run = open_run(tmp_path / "r.h5")
    # Epoch firsts 0, 6, 12, lasts 5, 11, 17; the NaN loss at step 8: step 9.
    assert list(run.steps) == [0, 5, 6, 9, 11, 12, 17]
    assert np.isfinite(run.stat("activation", "mean")).all()  # whole rows, not halves


def test_irregular_steps_are_drawn_at_their_true_positions(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    chosen = [0, 1, 2, 10, 50]
    with Recorder(model, opt, tmp_path / "r.h5", every=at(chosen)) as rec:
        for _ in range(51):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            rec.log()
    run = open_run(tmp_path / "r.h5")
    fig = gradient_heatmap([run], stat="param/grad_norm", all_layers=True)
    mesh = fig.axes[0].collections[0]
    xs = mesh.get_coordinates()[0, :, 0]
    # Halfway between recorded steps; the outer columns reach half a gap out.
    np.testing.assert_allclose(xs, [-0.5, 0.5, 1.5, 6.0, 30.0, 70.0])
    centres = (xs[:-1] + xs[1:]) / 2
    for step, a, b in zip(chosen, xs[:-1], xs[1:], strict=True):
        assert a < step < b
    assert np.all(np.diff(centres) > 0)
    np.testing.assert_allclose(
        np.ma.getdata(mesh.get_array()), run.stat("param", "grad_norm").T, rtol=1e-6
    )


def test_commits_grow_from_one_row(tmp_path, monkeypatch) -> None:
    # The first row is on disk at once and each commit holds twice the last one's rows
    # (up to flush_every): a budget learns the file system's cost per row early.
    sizes: list[int] = []
    append = RunWriter.append_steps

    def logged_append(self, rows):  # type: ignore[no-untyped-def]
        sizes.append(len(rows.steps))
        append(self, rows)

    monkeypatch.setattr(RunWriter, "append_steps", logged_append)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(8, 4)
    with Recorder(model, opt, tmp_path / "r.h5", flush_every=12, flush_seconds=600) as rec:
        for _ in range(40):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            rec.log()
    assert sizes == [1, 2, 4, 8, 12, 12, 1]
    assert open_run(tmp_path / "r.h5").n_steps == 40
