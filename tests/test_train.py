"""The training loop: determinism, exact resume, recorded metrics, non-finite handling.

Every run is tiny: the ``tiny`` model on 32 px crops of 7 synthetic 64 px slices, 2 steps
per epoch, validation on one slice.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gradflow import GradflowError, Run, open_run
from gradflow.em import loop
from gradflow.em import train as train_module
from gradflow.em.checkpoint import checkpoint_path, load_checkpoint
from gradflow.em.loop import build_optimizer
from gradflow.em.metrics import LOSSES
from gradflow.em.models import create_model
from gradflow.em.train import Summary, TrainConfig, train
from gradflow.statistics import STATISTICS

STEPS = 2
TINY = TrainConfig(
    model="tiny",
    synthetic_slices=7,
    synthetic_size=64,
    epochs=3,
    steps_per_epoch=STEPS,
    crop=32,
    batch_size=2,
    val_slices=1,
)
POISONED = "down3.0.conv1"


pytestmark = pytest.mark.usefixtures("one_thread")


def run(path: Path, *, force: bool = False, resume: bool = False, **changes: Any) -> Summary:
    config = dataclasses.replace(TINY, **changes)
    summary = train(config, path, force=force, resume=resume, progress="off")
    assert summary is not None
    return summary


def step_stats(run: Run) -> dict[str, np.ndarray]:
    return {
        f"{probe}/{stat}": run.stat(probe, stat)
        for probe, stats in run.probes().items()
        for stat in stats
    }


def epoch_stats(run: Run) -> dict[str, np.ndarray]:
    out = {name: run.stat("epoch", name) for name in run.epoch_stats()}
    out.update({f"metric/{k}": v for k, v in run.metrics.items()})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a, b: the same seed; other: seed 1, validated every 2nd epoch; resumed: 2 + 1 epochs;
    legacy: the same from a checkpoint without the recorder's state (as older versions
    wrote them)."""
    root = tmp_path_factory.mktemp("runs")
    names = ("a", "b", "other", "resumed", "legacy")
    paths = {name: root / f"{name}.h5" for name in names}
    run(paths["a"])
    run(paths["b"])
    run(paths["other"], seed=1, val_every=2)
    run(paths["resumed"], epochs=2)
    run(paths["resumed"], resume=True)
    run(paths["legacy"], epochs=2)
    payload = torch.load(checkpoint_path(paths["legacy"]), weights_only=True)
    del payload["recorder"]
    torch.save(payload, checkpoint_path(paths["legacy"]))
    run(paths["legacy"], resume=True)
    return paths


def test_same_seed_repeats_exactly_and_another_seed_differs(runs: dict[str, Path]) -> None:
    with open_run(runs["a"]) as a, open_run(runs["b"]) as b, open_run(runs["other"]) as c:
        # Every statistic of the default probes is in the file.
        assert set(step_stats(a)) == {
            key for key in STATISTICS if key.split("/")[0] in ("param", "activation", "grad_output")
        }
        for key, values in step_stats(a).items():
            np.testing.assert_array_equal(values, step_stats(b)[key], err_msg=key)
        for key, values in epoch_stats(a).items():
            np.testing.assert_array_equal(values, epoch_stats(b)[key], err_msg=key)
        np.testing.assert_array_equal(a.loss, b.loss)
        assert not np.allclose(a.stat("param", "grad_norm"), c.stat("param", "grad_norm"))


@pytest.mark.parametrize("name", ["resumed", "legacy"])
def test_resumed_run_equals_uninterrupted_run(runs: dict[str, Path], name: str) -> None:
    with open_run(runs["a"]) as straight, open_run(runs[name]) as resumed:
        np.testing.assert_array_equal(resumed.steps, np.arange(3 * STEPS))
        np.testing.assert_array_equal(resumed.epochs, [0, 1, 2])
        assert [(e.kind, e.step) for e in resumed.events] == [("resume", 2 * STEPS)]
        for key, values in step_stats(straight).items():
            np.testing.assert_allclose(step_stats(resumed)[key], values, rtol=1e-6, err_msg=key)
        for key, values in epoch_stats(straight).items():
            np.testing.assert_allclose(epoch_stats(resumed)[key], values, rtol=1e-6, err_msg=key)
        np.testing.assert_allclose(resumed.loss, straight.loss, rtol=1e-6)
    checkpoint = load_checkpoint(checkpoint_path(runs[name]))
    assert (checkpoint.epoch, checkpoint.step) == (3, 3 * STEPS)
    # The recorder's state at the end of the last epoch: its next step, and its epoch.
    assert checkpoint.recorder == {
        "version": 1,
        "path": str(runs[name].resolve()),
        "step": 3 * STEPS,
        "epoch": 3,
        "budget": None,
    }


def test_run_file_has_epoch_metrics_and_statistics(runs: dict[str, Path]) -> None:
    with open_run(runs["a"]) as a:
        metrics = a.metrics
        for name in ("train_loss", "val_loss", "pixel_error", "v_rand", "v_info", "lr"):
            assert metrics[name].shape == (3,) and np.isfinite(metrics[name]).all(), name
        assert metrics["pixel_error"].min() >= 0 and metrics["v_rand"].max() <= 1
        assert a.stat("epoch", "update_abs_mean").shape == (3, a.n_layers)
        assert (a.stat("epoch", "update_abs_mean") > 0).all()
        assert a.config["model"]["name"] == "tiny" and a.config["seed"] == 0
        assert a.config["optimizer"]["weight_decay_on"] == "convolution weights"
        assert a.config["world_size"] == 1
    with open_run(runs["other"]) as other:  # val_every=2: only epoch 1 is validated
        val = other.metrics["val_loss"]
        assert np.isnan(val[[0, 2]]).all() and np.isfinite(val[1])


def test_summary_reports_the_run(runs: dict[str, Path], tmp_path: Path) -> None:
    summary = run(tmp_path / "s.h5", epochs=2, val_every=1)
    assert summary.epochs == 2 and summary.steps == 2 * STEPS
    assert summary.best_epoch in (0, 1) and np.isfinite(summary.best_val_loss)
    assert summary.last_val_epoch == 1 and 0 <= summary.v_rand <= 1
    assert summary.file_bytes == (tmp_path / "s.h5").stat().st_size
    assert summary.stop_reason is None and summary.nonfinite is None
    assert summary.overhead["wall"] > 0
    assert summary.seconds_per_step > 0 and summary.seconds_per_validation > 0


def test_plain_progress_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(dataclasses.replace(TINY, epochs=1, log_every=1), tmp_path / "p.h5", progress="lines")
    lines = capsys.readouterr().out.splitlines()
    # What the run does before its first step: the model, then the data.
    assert lines[0] == "building model tiny (seed 0, default init)..."
    assert lines[1].startswith(("building the synthetic EM volume", "loading the synthetic"))
    lines = lines[2:]
    assert lines[0].startswith("step 0 epoch 0 loss ") and lines[0].endswith(" img/s)")
    assert lines[1].startswith("step 1 epoch 0 loss ")
    assert lines[2].startswith("epoch 0 train_loss ") and " v_rand " in lines[2]


# -- non-finite values ---------------------------------------------------------------------------
@pytest.fixture
def poisoned_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's ``POISONED`` weights turn NaN just before the third training forward."""

    def create(name: str, **overrides: Any) -> torch.nn.Module:
        model = create_model(name, **overrides)
        conv = model.get_submodule(POISONED)
        calls = []

        def poison(module: torch.nn.Module, args: Any) -> None:
            if module.training:
                calls.append(1)
                if len(calls) == 3:
                    with torch.no_grad():
                        module.weight.fill_(float("nan"))

        conv.register_forward_pre_hook(poison)
        return model

    monkeypatch.setattr(train_module, "create_model", create)


@pytest.mark.usefixtures("poisoned_model")
def test_nonfinite_stops_after_the_step(tmp_path: Path) -> None:
    summary = run(tmp_path / "nan.h5", on_nonfinite="stop")
    assert summary.stopped_step == 2
    assert summary.stop_reason is not None
    assert "step 2" in summary.stop_reason and POISONED in summary.stop_reason
    with open_run(tmp_path / "nan.h5") as nan:
        np.testing.assert_array_equal(nan.steps, [0, 1, 2])
        event = nan.first_nonfinite
        assert event is not None
        assert (event.step, event.probe, event.layer) == (2, "param", POISONED)
        assert nan.n_epochs == 1  # the stopped epoch is not closed
    assert load_checkpoint(checkpoint_path(tmp_path / "nan.h5")).epoch == 1


@pytest.mark.usefixtures("poisoned_model")
def test_nonfinite_continue_trains_to_the_end(tmp_path: Path) -> None:
    summary = run(tmp_path / "nan.h5", on_nonfinite="continue")
    assert summary.stopped_step is None and summary.stop_reason is None
    with open_run(tmp_path / "nan.h5") as nan:
        np.testing.assert_array_equal(nan.steps, np.arange(3 * STEPS))
        event = nan.first_nonfinite
        assert event is not None and (event.step, event.layer) == (2, POISONED)
        assert np.isnan(nan.loss[2:]).all() and nan.n_epochs == 3


# -- settings and files ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1, got 0"),
        ({"steps_per_epoch": -1}, "steps_per_epoch must be at least 1, got -1"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"crop": -32}, "crop must be at least 1, got -32"),
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"loss": "dise"}, "did you mean 'dice'"),
        ({"probes": ("params",)}, "did you mean 'param'"),
        ({"on_nonfinite": "ignore"}, "unknown on_nonfinite choice 'ignore'"),
        ({"device": "gpu"}, "device must be cpu, cuda or cuda:N"),
        ({"val_slices": 6}, "val_slices must be 1 to 5"),
        ({"crop": 36}, "crop 36 does not suit tiny: input 36x36 is not a multiple of 8"),
        ({"crop": 128}, "crop 128x128 does not fit the 64x64 slices"),
        ({"model": "tinny"}, "did you mean 'tiny'"),
        ({"model_overrides": {"batchnorm": False}}, "did you mean 'batch_norm'"),
    ],
)
def test_bad_settings_fail_before_writing(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(GradflowError, match=re.escape(message)) as caught:
        run(tmp_path / "bad.h5", **change)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_cuda_requested_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(GradflowError, match="--device cuda: CUDA is not available on this machine"):
        run(tmp_path / "gpu.h5", device="cuda")


def test_resume_checks(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "a.h5"
    copy.write_bytes(runs["a"].read_bytes())
    with pytest.raises(GradflowError, match=r"cannot resume: no checkpoint .*a\.h5\.ckpt\.pt"):
        run(copy, epochs=4, resume=True)
    checkpoint_path(copy).write_bytes(checkpoint_path(runs["a"]).read_bytes())
    with pytest.raises(GradflowError, match="already has 3 epochs; raise epochs above 3"):
        run(copy, resume=True)
    with pytest.raises(GradflowError, match=r"other settings .*crop 32 -> 64, seed 0 -> 2"):
        run(copy, epochs=4, crop=64, seed=2, resume=True)
    with pytest.raises(GradflowError, match="force and resume exclude each other"):
        train(TINY, copy, force=True, resume=True)
    assert copy.read_bytes() == runs["a"].read_bytes()


def test_fresh_run_refuses_an_existing_file_and_replaces_it_with_force(tmp_path: Path) -> None:
    path = tmp_path / "r.h5"
    path.write_bytes(b"precious")
    with pytest.raises(GradflowError, match="file exists; pass --force"):
        run(path, epochs=1)
    assert path.read_bytes() == b"precious"
    checkpoint_path(path).write_bytes(b"stale")
    run(path, epochs=1, force=True)
    with open_run(path) as replaced:
        assert replaced.n_epochs == 1
    assert load_checkpoint(checkpoint_path(path)).epoch == 1


def test_damaged_checkpoint_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(GradflowError, match="not a readable gradflow checkpoint"):
        load_checkpoint(path)


def test_checkpoint_path_sits_beside_the_run_file() -> None:
    assert checkpoint_path("runs/a.h5") == Path("runs/a.h5.ckpt.pt")
    assert checkpoint_path("runs/a.hdf5") == Path("runs/a.hdf5.ckpt.pt")
    assert checkpoint_path("runs/a") == Path("runs/a.ckpt.pt")


def test_weight_decay_only_on_convolution_weights() -> None:
    model = create_model("tiny")
    optimizer = build_optimizer(model, TINY)
    decayed, plain = optimizer.param_groups
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {id(p) for p in decayed["params"]} == {id(p) for p in convs}
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert optimizer.defaults["alpha"] == 0.9 and optimizer.defaults["eps"] == 1e-8


@pytest.mark.parametrize("name", ["dice", "bce"])
def test_global_batch_loss_sums_reproduce_the_loss(name: str) -> None:
    """The DDP loss is built from sums; in one process they give :data:`LOSSES` exactly."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.7).double()
    from_sums = loop._loss_from_sums(name, loop._loss_sums(name, logits, target))
    torch.testing.assert_close(from_sums, LOSSES.get(name)(logits, target))


def test_validation_tiles() -> None:
    assert loop._tiling((512, 512), 96, 32) == (512, 0)  # whole slice, no seams
    assert loop._tiling((500, 500), 96, 32) == (480, 120)
    assert loop._tiling((1024, 1024), 96, 32) == (512, 128)
    assert loop._tiling((64, 64), 32, 8) == (64, 0)
