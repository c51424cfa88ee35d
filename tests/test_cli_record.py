"""``gradflow record`` end to end: runs, resume, non-finite exit, every bad input, DDP.

Runs are tiny (the ``tiny`` model, 32 px crops, 2 steps per epoch). Most go through
``main()`` in this process; the end-to-end, one bad input and DDP runs start real processes.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from runfiles import write_slices

from gradflow import open_run
from gradflow.cli.main import main
from gradflow.em.checkpoint import checkpoint_path, legacy_checkpoint_path, load_checkpoint
from gradflow.em.config import TrainConfig
from gradflow.em.train import Summary
from gradflow.runfile import lock_path

TINY = [
    "--model", "tiny", "--epochs", "1", "--steps-per-epoch", "2", "--crop", "32",
    "--batch-size", "2", "--val-slices", "1", "--log-every", "1",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    flat = np.full((3, 64, 64), 128)
    no_labels = root / "no_labels" / "train" / "images"
    no_labels.mkdir(parents=True)
    Image.fromarray(flat[0].astype(np.uint8)).save(no_labels / "00.png")
    mixed = write_slices(root / "mixed", flat, flat)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(mixed / "train" / "images" / "01.png")
    text = write_slices(root / "text", flat, flat)
    (text / "train" / "images" / "00.png").write_text("not an image\n")
    return {
        "missing": root / "nowhere",
        "no_labels": root / "no_labels",
        "mixed": mixed,
        "text": text,
    }


@pytest.fixture(scope="module")
def protected(em: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run with its checkpoint, and a run file without one."""
    root = tmp_path_factory.mktemp("protected")
    run = root / "run.h5"
    status, _, err = gradflow(None, "record", *TINY, "--data", em, "--out", run)
    assert status == 0, err
    lonely = root / "lonely" / "run.h5"
    lonely.parent.mkdir()
    shutil.copy(run, lonely)
    return {"run": run, "ckpt": checkpoint_path(run), "lonely": lonely}


def gradflow(capsys: pytest.CaptureFixture[str] | None, *args: object) -> tuple[int, str, str]:
    """The command line in this process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        status = 0
    except SystemExit as done:
        status = int(done.code or 0)
    if capsys is None:
        return status, "", ""
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.slow  # the 30 synthetic 512 px slices take seconds to generate
def test_record_end_to_end_on_synthetic_data(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    args = [*TINY, "--epochs", "2", "--seed", "3", "--data", "synthetic", "--out", out]
    done = subprocess.run(
        [sys.executable, "-m", "gradflow.cli.main", "record", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    first = next(line for line in lines if line.startswith("step "))
    assert first.startswith("step 0 epoch 0 loss ")
    assert any(line.startswith("epoch 1 train_loss ") for line in lines)
    assert "gradflow record" in done.stdout and "best val_loss" in done.stdout
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, np.arange(4))
        np.testing.assert_array_equal(run.epochs, [0, 1])
        assert {"train_loss", "val_loss", "pixel_error", "v_rand", "v_info"} <= set(run.metrics)
        assert run.config["model"]["name"] == "tiny" and run.config["seed"] == 3
        assert run.config["data"]["source"].startswith("synthetic EM")
        assert run.config["command"].startswith("gradflow record --model tiny")
    assert checkpoint_path(out).is_file()


def test_resume_extends_a_run(capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    status, _, err = gradflow(capsys, "record", *TINY, "--data", em, "--out", out)
    assert status == 0, err
    status, stdout, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--out", out, "--epochs", "2", "--resume"
    )
    assert status == 0, err
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert steps[0].startswith("step 2 epoch 1 loss ")
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, np.arange(4))
        assert [(e.kind, e.step) for e in run.events] == [("resume", 2)]


def test_resume_under_a_budget(
    capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run.h5"
    budget = [*TINY, "--steps-per-epoch", "6", "--budget", "0.05", "--data", em, "--out", out]
    status, _, err = gradflow(capsys, "record", *budget)
    assert status == 0, err
    with open_run(out) as run:
        first = run.steps
    status, _, err = gradflow(capsys, "record", *budget, "--epochs", "2", "--resume")
    assert status == 0, err
    with open_run(out) as run:
        steps = run.steps
        assert run.attrs["budget"] == 0.05 and [(e.kind, e.step) for e in run.events] == [
            ("resume", 6)
        ]
    np.testing.assert_array_equal(steps[steps < 6], first)
    # Forced by the budget: step 0, each epoch's first and last step.
    assert {0, 5, 6, 11} <= set(steps.tolist()) and np.all(np.diff(steps) > 0)


def test_nonfinite_stops_with_exit_1_and_continue_does_not(
    capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nan.h5"
    status, _, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--lr", "1e30", "--epochs", "2", "--out", out
    )
    assert status == 1
    assert err.startswith("gradflow: error: training stopped at step 1 (epoch 0): ")
    assert len(err.splitlines()) == 1 and "down1.conv" in err
    with open_run(out) as run:
        event = run.first_nonfinite
        assert event is not None and (event.step, event.layer) == (1, "down1.conv")
        np.testing.assert_array_equal(run.steps, [0, 1])
    status, stdout, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--lr", "1e30", "--out", out, "--force",
        "--on-nonfinite", "continue",
    )  # fmt: skip
    assert status == 0, err
    assert "non-finite" in stdout
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, [0, 1])


BAD_INPUTS: list[tuple[str, list[str], str]] = [
    ("unknown model", ["--model", "fig3a-long-short"], "did you mean 'fig3a-long-short-9'"),
    ("missing data folder", ["--data", "{missing}"], "data folder not found"),
    ("folder without labels", ["--data", "{no_labels}"], "labels folder missing"),
    ("mismatched sizes", ["--data", "{mixed}"], "is 48x48 but"),
    ("non-image files", ["--data", "{text}"], "cannot read as images"),
    ("crop larger than the images", ["--crop", "128"], "crop 128x128 does not fit the 64x64"),
    ("crop the model refuses", ["--crop", "36"], "36x36 is not a multiple of 8"),
    ("zero epochs", ["--epochs", "0"], "epochs must be at least 1, got 0"),
    ("negative epochs", ["--epochs", "-3"], "epochs must be at least 1, got -3"),
    ("zero batch", ["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    ("negative batch", ["--batch-size", "-2"], "batch_size must be at least 1, got -2"),
    ("zero steps", ["--steps-per-epoch", "0"], "steps_per_epoch must be at least 1, got 0"),
    ("negative steps", ["--steps-per-epoch", "-1"], "steps_per_epoch must be at least 1"),
    ("unknown loss", ["--loss", "dise"], "did you mean 'dice'"),
    ("bad model option", ["--model-option", "batch_norm"], "expected KEY=VALUE"),
    ("unknown model option", ["--model-option", "batchnorm=0"], "did you mean 'batch_norm'"),
    ("on-nonfinite choice", ["--on-nonfinite", "skip"], "unknown on_nonfinite choice"),
    ("seed above 2**63 - 1", ["--seed", str(2**63)], "seed must be at most 2**63 - 1"),
    ("seed above uint64", ["--seed", "99999999999999999999"], "seed must be at most"),
    ("nesterov with adam", ["--optimizer", "adam", "--nesterov"], "--nesterov applies to"),
    ("no-nesterov with rmsprop", ["--no-nesterov"], "--no-nesterov applies to --optimizer sgd"),
    ("not a float", ["--lr", "abc"], "Invalid value for '--lr'"),
    ("every and budget", ["--every", "2", "--budget", "0.1"], "--every and --budget exclude"),
    ("budget above 1", ["--budget", "1.5"], "budget must be between 0 and 1, got 1.5"),
    ("unknown option", ["--learning-rate", "0.1"], "No such option: --learning-rate"),
]


@pytest.mark.parametrize(
    ("args", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_line_and_damages_nothing(
    capsys: pytest.CaptureFixture[str],
    em: Path,
    bad_data: dict[str, Path],
    protected: dict[str, Path],
    args: list[str],
    message: str,
) -> None:
    args = [a.format(**bad_data) for a in args]
    data = [] if "--data" in args else ["--data", str(em)]
    before = {name: path.read_bytes() for name, path in protected.items()}
    # --force: only the early checks stand between a bad input and the existing run file.
    status, out, err = gradflow(
        capsys, "record", *TINY, *data, *args, "--out", protected["run"], "--force"
    )
    assert_one_line_error(status, err, message, stdout=out)
    assert {name: path.read_bytes() for name, path in protected.items()} == before


def test_existing_out_without_force(
    capsys: pytest.CaptureFixture[str], em: Path, protected: dict[str, Path]
) -> None:
    before = protected["run"].read_bytes()
    status, out, err = gradflow(capsys, "record", *TINY, "--data", em, "--out", protected["run"])
    assert_one_line_error(status, err, "file exists; pass --force", stdout=out)
    assert protected["run"].read_bytes() == before


def test_resume_without_checkpoint(
    capsys: pytest.CaptureFixture[str], em: Path, protected: dict[str, Path]
) -> None:
    before = protected["lonely"].read_bytes()
    status, out, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--epochs", "2", "--out", protected["lonely"],
        "--resume",
    )  # fmt: skip
    assert_one_line_error(status, err, "cannot resume: no checkpoint", stdout=out)
    assert protected["lonely"].read_bytes() == before


def test_x_h5_and_x_hdf5_keep_checkpoints_of_their_own(
    capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path
) -> None:
    h5, hdf5 = tmp_path / "x.h5", tmp_path / "x.hdf5"
    for out, seed in ((h5, "1"), (hdf5, "2")):
        status, _, err = gradflow(
            capsys, "record", *TINY, "--data", em, "--seed", seed, "--out", out
        )
        assert status == 0, err
    assert checkpoint_path(h5).name == "x.h5.ckpt.pt"
    assert load_checkpoint(checkpoint_path(h5)).config["seed"] == 1
    assert load_checkpoint(checkpoint_path(hdf5)).config["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x.h5", "x.h5.ckpt.pt", "x.hdf5", "x.hdf5.ckpt.pt",
    ]  # fmt: skip
    status, _, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--seed", "1", "--epochs", "2", "--out", h5,
        "--resume",
    )  # fmt: skip
    assert status == 0, err


def test_resume_reads_the_older_checkpoint_name(
    capsys: pytest.CaptureFixture[str], em: Path, protected: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run.h5"
    shutil.copy(protected["run"], out)
    shutil.copy(protected["ckpt"], legacy_checkpoint_path(out))
    assert legacy_checkpoint_path(out).name == "run.ckpt.pt"
    status, _, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--epochs", "2", "--out", out, "--resume"
    )
    assert status == 0, err
    assert load_checkpoint(checkpoint_path(out)).epoch == 2
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, np.arange(4))


def test_resume_compares_resolved_data_paths_and_probe_sets(
    capsys: pytest.CaptureFixture[str],
    em: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run.h5"
    probes = ["--probes", "param,activation"]
    status, _, err = gradflow(capsys, "record", *TINY, "--data", em, *probes, "--out", out)
    assert status == 0, err
    monkeypatch.chdir(em.parent)
    status, _, err = gradflow(
        capsys, "record", *TINY, "--data", f"./{em.name}/", "--probes", "activation,param",
        "--epochs", "2", "--out", out, "--resume",
    )  # fmt: skip
    assert status == 0, err
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, np.arange(4))
        assert set(run.probes()) == {"param", "activation"}
    status, _, err = gradflow(
        capsys, "record", *TINY, "--data", f"./{em.name}/", "--probes", "activation",
        "--epochs", "3", "--out", out, "--resume",
    )  # fmt: skip
    assert_one_line_error(status, err, "other settings than its checkpoint's: probes")


def _forged(checkpoint: Path, change: str) -> None:
    """Rewrite a real checkpoint with one field forged."""
    payload = torch.load(checkpoint, weights_only=True)
    if change == "garbage":
        checkpoint.write_bytes(b"PK\x03\x04 not a checkpoint")
        return
    if change == "step":
        payload["step"] = 1000
    elif change == "epoch":
        payload["epoch"], payload["step"] = 2, 4
    elif change == "epoch type":
        payload["epoch"] = "1"
    elif change == "model type":
        payload["model"] = [1, 2]
    elif change == "weights":
        name = next(iter(payload["model"]))
        payload["model"][name] = torch.zeros(3, 3)
    elif change == "optimizer state":
        state = payload["optimizer"]["state"][0]
        state["square_avg"] = torch.zeros(7)
    torch.save(payload, checkpoint)


FORGED = [
    ("garbage", "not a readable gradflow checkpoint"),
    ("step", "its step 1000 is not the end of epoch 1 (2 steps per epoch)"),
    ("epoch", "the run file holds 1 epochs but the checkpoint 2"),
    ("epoch type", "damaged checkpoint (epoch is '1', not a count)"),
    ("model type", "damaged checkpoint (model is not a dict of named tensors)"),
    ("weights", "its weights do not fit tiny: down1.conv.weight is (3, 3) in the checkpoint"),
    ("optimizer state", "its optimizer state square_avg is (7,)"),
]


@pytest.mark.parametrize(("change", "message"), FORGED, ids=[c for c, _ in FORGED])
def test_damaged_or_mismatched_checkpoint_is_one_line_before_any_write(
    capsys: pytest.CaptureFixture[str],
    em: Path,
    protected: dict[str, Path],
    tmp_path: Path,
    change: str,
    message: str,
) -> None:
    out = tmp_path / "run.h5"
    shutil.copy(protected["run"], out)
    shutil.copy(protected["ckpt"], checkpoint_path(out))
    _forged(checkpoint_path(out), change)
    before = out.read_bytes(), checkpoint_path(out).read_bytes()
    status, _, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--epochs", "3", "--out", out, "--resume"
    )
    assert_one_line_error(status, err, message)
    assert (out.read_bytes(), checkpoint_path(out).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5", "run.h5.ckpt.pt"]


@pytest.mark.parametrize(("model", "crop"), [("tiny", "8"), ("fig3a-long-short-9", "32")])
def test_batch_norm_with_one_value_per_channel_is_refused_before_any_file(
    capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path, model: str, crop: str
) -> None:
    out = tmp_path / "run.h5"
    status, _, err = gradflow(
        capsys, "record", *TINY, "--data", em, "--model", model, "--crop", crop,
        "--batch-size", "1", "--out", out,
    )  # fmt: skip
    message = f"batch norm needs more than one value per channel: a batch of 1 with crop {crop}"
    assert_one_line_error(status, err, message)
    assert list(tmp_path.iterdir()) == []


def test_batch_norm_check_counts_the_bottleneck_values() -> None:
    from gradflow.em.inputs import check_batch_norm
    from gradflow.em.models import create_model

    tiny = create_model("tiny")  # downsampling 8
    for crop, batch in ((16, 1), (8, 2)):  # 2x2 px of 1 sample, 1x1 px of 2 samples
        check_batch_norm(tiny, crop, batch)
    check_batch_norm(create_model("tiny", batch_norm=False), 8, 1)


def _special_files(tmp_path: Path) -> list[tuple[Path, str, list[str]]]:
    """(path, what it is, extra options): a FIFO and a character device of our own with
    --force, and the system's /dev/null without --force (which never replaces anything)."""
    fifo = tmp_path / "fifo.h5"
    os.mkfifo(fifo)
    cases = [(fifo, "a FIFO", ["--force"]), (Path("/dev/null"), "a character device", [])]
    null = tmp_path / "null.h5"
    try:  # the same device as /dev/null, in the test's own folder (needs root)
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        cases.append((null, "a character device", ["--force"]))
    except PermissionError:
        pass
    return cases


def test_only_regular_files_are_replaced(
    capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path
) -> None:
    for path, kind, extra in _special_files(tmp_path):
        mode = path.stat().st_mode
        status, out, err = gradflow(capsys, "record", *TINY, "--data", em, "--out", path, *extra)
        assert_one_line_error(
            status, err, f"{path}: {kind}, not a regular file; not replacing it", stdout=out
        )
        assert path.stat().st_mode == mode
        assert not lock_path(path).exists() and not checkpoint_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) <= ["fifo.h5", "null.h5"]


def test_missing_out(capsys: pytest.CaptureFixture[str], em: Path) -> None:
    status, _, err = gradflow(capsys, "record", *TINY, "--data", em)
    assert_one_line_error(status, err, "missing --out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_through_the_real_entry_point(
    em: Path, protected: dict[str, Path]
) -> None:
    before = protected["run"].read_bytes()
    done = subprocess.run(
        [
            sys.executable, "-m", "gradflow.cli.main", "record", *TINY, "--data", str(em),
            "--device", "cuda", "--out", str(protected["run"]), "--force",
        ],
        capture_output=True, text=True, timeout=120, env=ENV,
    )  # fmt: skip
    assert_one_line_error(
        done.returncode, done.stderr, "--device cuda: CUDA is not available on this machine"
    )
    assert protected["run"].read_bytes() == before


def test_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = gradflow(capsys, "record", "--help")
    assert status == 0
    for example in ("--data synthetic", "../shared/data/isbi2012", "paper-resunet", "torchrun"):
        assert example in out


def assert_one_line_error(status: int, err: str, message: str, stdout: str | None = None) -> None:
    """One error line, exit 2; with ``stdout``: the error comes before any progress line."""
    assert status == 2
    assert stdout is None or stdout == "", stdout
    assert err.startswith("gradflow: error: ") and len(err.splitlines()) == 1, err
    assert message in err and "Traceback" not in err


def test_largest_seed_trains_and_sgd_keeps_nesterov_by_default(
    capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run.h5"
    args = ["--seed", str(2**63 - 1), "--optimizer", "sgd", "--out", out]
    status, _, err = gradflow(capsys, "record", *TINY, "--data", em, *args)
    assert status == 0, err
    with open_run(out) as run:
        assert run.config["seed"] == 2**63 - 1
        assert run.config["optimizer"]["nesterov"] is True


@pytest.mark.parametrize(
    "args",
    [
        ["record", "--model", "tiny", "--lr", "abc", "--out", "x.h5"],
        ["models", "--bogus"],
        ["no-such-command"],
        ["info"],
        ["serve", "x.h5", "--port", "abc"],
    ],
    ids=["record-lr", "models-option", "command", "info-argument", "serve-port"],
)
def test_usage_errors_through_the_real_entry_point(args: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gradflow.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(done.returncode, done.stderr, "", stdout=done.stdout)
    assert list(tmp_path.iterdir()) == []


def test_help_and_no_arguments_show_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = gradflow(capsys, "--help")
    assert status == 0 and "record" in out and err == ""
    status, out, err = gradflow(capsys)
    assert status == 2 and "Usage: gradflow" in out + err and "error" not in out + err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_outside_training_is_one_line_and_128_plus_signal(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    sig: signal.Signals,
) -> None:
    """A signal while a command's input is checked (here: as the settings are validated)."""

    def signalled(self: TrainConfig) -> None:
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(TrainConfig, "validate", signalled)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    status, out, err = gradflow(capsys, "record", *TINY, "--out", tmp_path / "run.h5")
    assert (status, out, err) == (128 + sig, "", "gradflow: interrupted\n")
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert list(tmp_path.iterdir()) == []


def _summary(path: Path, **changes: Any) -> Summary:
    fields: dict[str, Any] = {
        "path": path, "checkpoint": checkpoint_path(path), "file_bytes": 2**20, "model": "tiny",
        "conv_layers": 5, "n_params": 1000, "data": "synthetic", "epochs": 0, "steps": 1,
        "best_val_loss": math.nan, "best_epoch": None, "last_val_epoch": None,
        "v_rand": math.nan, "v_info": math.nan, "seconds_per_step": math.nan,
        "seconds_per_validation": math.nan, "overhead": {"wall": 1.0}, "nonfinite": None,
        "stopped_step": None, "interrupted": signal.SIGINT,
    }  # fmt: skip
    return Summary(**{**fields, **changes})


def test_summary_shows_only_what_exists_and_was_measured(tmp_path: Path) -> None:
    def shown(summary: Summary) -> str:
        console = Console(record=True, width=200, file=io.StringIO())
        console.print(summary)
        return console.export_text()

    run = tmp_path / "run.h5"
    early = shown(_summary(run))  # interrupted at step 1: no epoch ended, nothing timed
    assert "0 epochs, 1 step " in early and "1 step;" not in early
    assert "nan" not in early and "s/step" not in early and "ckpt" not in early
    checkpoint_path(run).write_bytes(b"")
    later = shown(_summary(run, epochs=2, steps=4, seconds_per_step=0.25))
    assert "2 epochs, 4 steps; 0.250 s/step" in later and "s/validation" not in later
    assert str(checkpoint_path(run)) in later and "nan" not in later


# -- DDP -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "dice"])
def test_ddp_records_what_one_process_records(
    capsys: pytest.CaptureFixture[str], em: Path, tmp_path: Path, loss: str
) -> None:
    """2 gloo ranks on the CPU, each on half of every global batch of 4, against 1 process.

    Batch norm normalises each rank's half by its own statistics and dropout draws masks per
    rank, so the comparison uses a model without either (``--model-option``); augmentation
    is kept, as it depends only on (seed, epoch, step, sample).
    """
    args = [
        "record", "--model", "tiny", "--model-option", "batch_norm=false",
        "--model-option", "dropout=0", "--data", str(em), "--epochs", "2",
        "--steps-per-epoch", "2", "--crop", "32", "--batch-size", "4", "--val-slices", "1",
        "--loss", loss,
    ]  # fmt: skip
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "gradflow.cli.main", *args,
            "--out", str(ddp / "run.h5"),
        ],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in ddp.iterdir()) == ["run.h5", "run.h5.ckpt.pt"]
    status, _, err = gradflow(capsys, *args, "--out", tmp_path / "single.h5")
    assert status == 0, err
    with open_run(ddp / "run.h5") as two, open_run(tmp_path / "single.h5") as one:
        assert two.config["world_size"] == 2 and one.config["world_size"] == 1
        np.testing.assert_array_equal(two.steps, one.steps)
        for stat in ("grad_norm", "update_norm"):
            np.testing.assert_allclose(
                two.stat("param", stat), one.stat("param", stat), rtol=1e-5, err_msg=stat
            )
        np.testing.assert_allclose(two.loss, one.loss, rtol=1e-5)
        np.testing.assert_allclose(two.metrics["train_loss"], one.metrics["train_loss"], rtol=1e-5)
