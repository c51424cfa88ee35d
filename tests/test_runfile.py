"""The run file: reading while written, surviving SIGKILL, clear errors on bad files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from runfiles import live_writer

from gradflow import GradflowError, open_run
from gradflow.runfile import SCHEMA_VERSION

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    import gradflow
    path, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    with gradflow.Recorder(model, opt, path, flush_every=3, flush_seconds=60) as rec:
        for step in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            rec.log(loss=loss)
            print(step, flush=True)
            time.sleep(pause)
    print("done", flush=True)
    """
)


def _start(tmp_path: Path, steps: int, pause: float) -> tuple[subprocess.Popen[str], Path]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "run.h5"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(steps), str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, path


def _wait_for_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == want:
            return
    raise AssertionError(
        f"writer ended before printing {want!r}: {proc.stderr.read() if proc.stderr else ''}"
    )


def test_readable_while_being_written(tmp_path: Path) -> None:
    # 150 steps x 50 ms: still writing after the checks below, however loaded the machine.
    proc, path = _start(tmp_path, steps=150, pause=0.05)
    try:
        _wait_for_line(proc, "10")
        seen = []
        for _ in range(4):
            with open_run(path) as run:
                steps = run.steps
                grad = run.stat("param", "grad_norm")
                assert grad.shape == (len(steps), 2)
                assert np.array_equal(steps, np.arange(len(steps)))
                assert np.isfinite(grad).all()
                seen.append(len(steps))
            time.sleep(0.4)
        assert seen[-1] > seen[0] > 0, seen
        # one handle, refreshed, also sees the file grow
        run = open_run(path)
        before = run.n_steps
        time.sleep(0.5)
        run.refresh()
        assert run.n_steps > before
        run.close()
        proc.wait(timeout=60)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    with open_run(path) as run:
        assert run.n_steps == 150


def test_sigkill_leaves_readable_file_losing_at_most_one_flush(tmp_path: Path) -> None:
    proc, path = _start(tmp_path, steps=1000, pause=0.05)
    _wait_for_line(proc, "20")
    time.sleep(0.2)  # let the writer thread take the rows printed so far
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with open_run(path) as run:
        steps = run.steps
        assert len(steps) >= 21 - 3  # flush_every=3: at most one flush interval lost
        assert np.array_equal(steps, np.arange(len(steps)))
        for probe, names in run.probes().items():
            for name in names:
                assert run.stat(probe, name).shape == (len(steps), 2)
        assert np.isfinite(run.stat("param", "grad_norm")).all()


def _write_h5(path: Path, attrs: dict) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(3))
        for k, v in attrs.items():
            f.attrs[k] = v


def _good_run(tmp_path: Path) -> Path:
    import torch
    from torch import nn

    import gradflow

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "good.h5"
    with gradflow.Recorder(model, opt, path):
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "no such run file"),
        ("empty", "empty file"),
        ("text", "not an HDF5 file"),
        ("truncated", "damaged or truncated"),
        ("foreign", "not a gradflow run"),
        ("newer", "schema v2"),
        ("directory", "is a directory"),
    ],
)
def test_open_run_bad_files(kind: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("step,loss\n1,0.5\n")
    elif kind == "truncated":
        data = _good_run(tmp_path).read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "foreign":
        _write_h5(path, {"title": "someone else's"})
    elif kind == "newer":
        good = _good_run(tmp_path)
        with h5py.File(good, "r+") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION + 1
        path = good
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(GradflowError, match=message) as info:
        open_run(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text


def test_run_file_layout(tmp_path: Path) -> None:
    path = _good_run(tmp_path)
    with h5py.File(path, "r", swmr=True) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        ds = f["stats/param/grad_norm"]
        assert ds.dtype == np.float32 and ds.maxshape == (None, 1)
        assert ds.chunks is not None and ds.compression == "gzip"
        assert list(f["counts"][()]) == [3, 0, 0]
    with open_run(path) as run:
        assert run.attrs["device"] == "cpu"
        assert run.n_layers == 1 and run.layers[0].n_params == 6
        assert run.overhead["wall"] > 0 and run.overhead["stats"] > 0


def test_live_reader_sees_epochs_and_metric_names_written_after_it_opened(tmp_path: Path) -> None:
    """The metric names are written in place by the writer once the first epoch closes;
    a reader that opened the file before must refresh past them and read them."""
    path = tmp_path / "live.h5"
    with live_writer(path) as tell:
        tell("steps 3", "commit")
        with open_run(path) as run:
            assert (run.n_steps, run.n_epochs, run.metrics) == (3, 0, {})
            tell("steps 7", "epoch", "commit")
            run.refresh()
            assert (run.n_steps, run.n_epochs) == (10, 1)
            assert run.metrics["train_loss"] == pytest.approx([0.7])
            tell("steps 10", "epoch", "commit")
            run.refresh()
            assert run.metrics["val_loss"] == pytest.approx([0.7, 0.45])
        tell("close")


def test_stat_takes_probe_and_name_or_the_whole_name(tmp_path: Path) -> None:
    with open_run(_good_run(tmp_path)) as run:
        both = run.stat("param", "grad_norm")
        assert both.shape == (3, 1) and np.isfinite(both).all()
        np.testing.assert_array_equal(run.stat("param/grad_norm"), both)
        np.testing.assert_array_equal(
            run.stat("param/grad_norm", rows=slice(1, 3), layers=[0]), both[1:3]
        )
        for bad in ("param", "param/", "/grad_norm", ""):
            with pytest.raises(GradflowError, match="expected PROBE/NAME"):
                run.stat(bad)
        with pytest.raises(GradflowError, match=r"unknown statistic .*'param/grad_nrom'"):
            run.stat("param/grad_nrom")


def _recorded(tmp_path: Path, name: str, **kwargs: object) -> Path:
    import torch
    from torch import nn

    import gradflow

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / name
    with gradflow.Recorder(model, opt, path, **kwargs):  # type: ignore[arg-type]
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(3, 2)).sum().backward()
            opt.step()
    return path


def _info_text(path: Path) -> str:
    from rich.console import Console

    from gradflow.plots.info import info_panel

    console = Console(record=True, width=200)
    with open_run(path) as run:
        console.print(info_panel(run))
    return console.export_text()


def _custom(step: int) -> bool:
    return step == 1


@pytest.mark.parametrize(
    "kwargs, schedule, steps",
    [
        ({}, "every 1", [0, 1, 2, 3]),
        ({"every": 3}, "every 3", [0, 3]),
        ({"every": "log"}, "log_spaced(dense_until=2, per_decade=1)", [0, 1, 2]),
        ({"every": _custom}, "custom test_runfile._custom", [1]),
        ({"budget": 0.5}, "budget 0.5", None),
    ],
)
def test_the_run_file_stores_how_it_was_recorded(
    tmp_path: Path, kwargs: dict, schedule: str, steps: list[int] | None
) -> None:
    from gradflow.schedule import log_spaced

    if kwargs.get("every") == "log":
        kwargs = {"every": log_spaced(dense_until=2, per_decade=1)}
    probes = ["grad_output", "param"]
    path = _recorded(tmp_path, "r.h5", probes=probes, **kwargs)
    with open_run(path) as run:
        assert run.schedule == schedule
        assert run.recorded_probes == probes
        if steps is not None:
            np.testing.assert_array_equal(run.steps, steps)
    shown = re.search(r"^schedule +(.*?) *$", _info_text(path), re.MULTILINE)
    assert shown is not None and shown[1] == f"{schedule}; probes grad_output, param"


def test_a_run_file_without_its_recording_attributes_still_reads(tmp_path: Path) -> None:
    path = _recorded(tmp_path, "old.h5", every=2)
    with h5py.File(path, "r+") as f:
        assert f.attrs["schedule"] == "every 2"
        del f.attrs["schedule"], f.attrs["recorded_probes"]
    with open_run(path) as run:
        assert (run.schedule, run.recorded_probes) == (None, None)
        np.testing.assert_array_equal(run.steps, [0, 2])
    text = _info_text(path)
    assert "\nsteps " in text and "\nschedule " not in text
    with h5py.File(path, "r+") as f:
        f.attrs["recorded_probes"] = 7
    with pytest.raises(GradflowError, match="'recorded_probes' is not a list of names") as err:
        open_run(path)
    assert "\n" not in str(err.value)
