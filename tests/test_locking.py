"""One writer per run file, and signals: real ``gradflow record`` processes.

A long run of the ``tiny`` model (32 px crops, 2 steps per epoch, no validation) is started
in a child process; a second writer (``--force``, ``--resume``, the Recorder API) must be
refused while it runs, readers must not be, a killed writer's lock must go with it, and
SIGINT / SIGTERM must stop it at a step boundary with a closed, resumable run file.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import numpy as np
import pytest

from gradflow import Recorder, open_run
from gradflow.cli.main import main
from gradflow.em.checkpoint import checkpoint_path, load_checkpoint
from gradflow.em.models import create_model
from gradflow.errors import GradflowError
from gradflow.runfile import WriteLock, lock_path

RUN = [
    "--model", "tiny", "--crop", "32", "--batch-size", "2", "--steps-per-epoch", "2",
    "--val-every", "0", "--log-every", "1", "--flush-every", "1",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INTERRUPTED = re.compile(r"gradflow: interrupted at step (\d+); resume with --resume")

pytestmark = pytest.mark.usefixtures("one_thread")


class Writer:
    """A ``gradflow record`` child process whose stdout lines are read as they come."""

    def __init__(self, args: list[str], env: dict[str, str] = ENV) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradflow.cli.main", "record", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.lines.put(line)

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        """The first stdout line starting with ``prefix``."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no line {prefix!r} within {timeout} s")
            if line.startswith(prefix):
                return line

    def stop(self, sig: int) -> tuple[int, str]:
        """Send ``sig``; (exit status, stderr)."""
        self.proc.send_signal(sig)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        return self.proc.wait(timeout=60), err

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def resume_one_more_epoch(out: Path, em: Path) -> int:
    """Resume ``out`` (in this process) for one epoch past its checkpoint; the epochs it
    then holds."""
    epochs = load_checkpoint(checkpoint_path(out)).epoch + 1
    args = [*RUN, "--data", str(em), "--epochs", str(epochs), "--out", str(out), "--resume"]
    try:
        main(["record", *args])
    except SystemExit as done:
        assert not done.code
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, np.arange(2 * epochs))
        assert run.n_epochs == epochs
        assert "resume" in [e.kind for e in run.events]
    return epochs


@pytest.mark.slow  # about 15 s: a live writer and two more processes
def test_second_writer_is_refused_while_the_first_runs(em: Path, tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    with Writer([*RUN, "--data", str(em), "--epochs", "100000", "--out", str(out)]) as live:
        live.wait_for("epoch 0 train_loss")
        busy = f"{out} is being written by process {live.proc.pid}"
        args = [*RUN, "--data", str(em), "--epochs", "200000", "--out", str(out)]
        second = [Writer([*args, extra]) for extra in ("--force", "--resume")]  # in parallel
        for refused in second:
            with refused:
                assert refused.proc.wait(timeout=60) == 2
                assert refused.proc.stderr is not None
                assert refused.proc.stderr.read() == f"gradflow: error: {busy}\n"
        with pytest.raises(GradflowError, match=re.escape(busy)):
            Recorder(create_model("tiny"), None, out, overwrite=True)
        with pytest.raises(GradflowError, match=re.escape(busy)):
            WriteLock.acquire(out)
        with open_run(out) as run:  # readers are never blocked
            seen = run.n_steps
            assert seen >= 2
        live.wait_for(f"step {seen + 4} ")  # the live run goes on
        live.proc.kill()
        live.proc.wait()
    WriteLock.acquire(out).release()  # the killed writer's lock went with its process
    with open_run(out) as run:  # unharmed: every committed step, and a checkpoint that fits
        np.testing.assert_array_equal(run.steps, np.arange(run.n_steps))
        checkpoint = load_checkpoint(checkpoint_path(out))
        assert run.epoch_end_step[checkpoint.epoch - 1] == checkpoint.step


@pytest.mark.slow  # about 10 s per signal: a run, then its resumption in this process
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_at_a_step_boundary_and_the_run_resumes(
    em: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "run.h5"
    with Writer([*RUN, "--data", str(em), "--epochs", "100000", "--out", str(out)]) as live:
        live.wait_for("epoch 1 train_loss")
        status, err = live.stop(sig)
    assert status == 128 + sig
    match = INTERRUPTED.fullmatch(err.rstrip("\n"))
    assert match is not None and err.count("\n") == 1, err
    steps = int(match[1])
    with open_run(out) as run:  # flushed and closed: every step done is in the file
        np.testing.assert_array_equal(run.steps, np.arange(steps))
        assert run.n_epochs >= 2
    assert not lock_path(out).exists()
    resume_one_more_epoch(out, em)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_before_training_is_one_line_and_128_plus_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """While the synthetic volume is built (an empty cache: seconds), before any step."""
    out = tmp_path / "run.h5"
    env = {**ENV, "GRADFLOW_CACHE_DIR": str(tmp_path / "cache")}
    with Writer([*RUN, "--data", "synthetic", "--out", str(out)], env) as early:
        early.wait_for("building the synthetic EM volume")
        status, err = early.stop(sig)
    assert (status, err) == (128 + sig, "gradflow: interrupted\n")
    assert not out.exists() and not checkpoint_path(out).exists() and not lock_path(out).exists()


def test_lock_is_reentrant_in_a_process_and_removed_by_its_last_holder(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    outer = WriteLock.acquire(out)
    assert lock_path(out).read_text() == f"{os.getpid()}\n"
    inner = WriteLock.acquire(out)
    inner.release()
    inner.release()  # idempotent
    assert lock_path(out).exists()
    outer.release()
    assert not lock_path(out).exists()


def test_lock_file_that_is_a_link_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    out = tmp_path / "run.h5"
    lock_path(out).symlink_to(victim)
    with pytest.raises(GradflowError, match=r"the lock file .* is a symbolic link"):
        WriteLock.acquire(out)
    assert victim.read_text() == "keep\n"
