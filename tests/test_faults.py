"""Faults and bad input: gradflow keeps working, loses no recorded data beyond the last
flush, and never damages a run file.

What the other test files already cover is not repeated here: SIGKILL of a bare Recorder
(test_runfile), exact resume after a clean stop (test_train, test_cli_record), non-finite
stop/continue at the API and ``--on-nonfinite stop`` at the CLI (test_train,
test_cli_record), missing and text run files for ``plot`` (test_cli_plot), bad files at
``open_run`` (test_runfile). Here: SIGKILL of a real ``gradflow record`` at seeded random
moments, resume after such a kill, an unwritable ``--out``, a full disk (``RLIMIT_FSIZE`` in
the child: writes past the limit fail with EFBIG) while creating, resuming and appending to
a run file, ``--on-nonfinite continue`` over epochs, and bad run files given to ``plot``,
``info`` and ``record --resume``; a truncated run file fails fast (SWMR reads of damaged
metadata would otherwise retry for minutes).

Every run is tiny: the ``tiny`` model, 32 px crops of 7 synthetic 64 px slices in the ISBI
layout (``--data synthetic`` generates 30 slices of 512 px: seconds per process), 3 epochs
of 8 steps, validation on one slice after every epoch, one thread.

Loss bound after SIGKILL (``--flush-every F``, ``--log-every 1``). The line ``step N`` is
printed after optimizer step N, while row N is still open in the training thread: it goes
to the writer thread when step N+1's forward starts (or at the epoch end). The writer
commits every F rows, and ``/counts`` is published only after the rows it counts. Let L be
the last ``step`` line printed before the kill (stdout is read to its end after the process
died). The run file then holds exactly the rows 0..n-1, with

    L + 1 - (F + 2)  <=  n  <=  L + 1

losing at most row L (open), one row handed over but not yet taken by the writer thread
(it takes ~1 ms per row, a step ~10 ms) and F rows buffered or in the commit being written.
``n <= L + 1``: no row is ever visible for a step that did not print its line. After an
``epoch E`` line, epoch E's rows, its epoch row and the checkpoint are all on disk (the
loop flushes the run file, then writes the checkpoint, then prints the line), so
``E + 1 <= checkpoint epoch <= epochs in the file``. Killed before the writer thread
created the run file, there is no file at all: it is built complete and renamed into place.

Tolerances: a resumed run equals an uninterrupted one to rtol 1e-6 (CPU with deterministic
algorithms; in practice bitwise); every committed row has a finite loss and gradient norm
(the datasets' fill value is NaN, so a row counted before its data landed would show).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from gradflow import Run, open_run
from gradflow.cli.main import main
from gradflow.em.checkpoint import checkpoint_path, load_checkpoint
from gradflow.runfile import SCHEMA_VERSION

SPE, EPOCHS, FLUSH = 8, 3, 2  # steps per epoch, epochs, --flush-every
TOTAL = SPE * EPOCHS
RECORD = [
    "record", "--model", "tiny", "--epochs", str(EPOCHS), "--steps-per-epoch", str(SPE),
    "--crop", "32", "--batch-size", "2", "--val-slices", "1", "--val-every", "1",
    "--log-every", "1", "--flush-every", str(FLUSH),
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEP_LINE = re.compile(r"step (\d+) epoch \d+ loss ")
EPOCH_LINE = re.compile(r"epoch (\d+) train_loss ")


# -- fixtures and helpers -------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(em: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run (in this process) with its checkpoint."""
    out = tmp_path_factory.mktemp("reference") / "run.h5"
    status, err = gradflow(*record_args(em, out))
    assert status == 0, err
    return out


def record_args(em: Path, out: Path, *extra: str) -> list[str]:
    return [*RECORD, "--data", str(em), "--out", str(out), *extra]


def gradflow(*args: object) -> tuple[int, str]:
    """The command line in this process: (exit status, stderr)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main([str(a) for a in args])
        status = 0
    except SystemExit as done:
        status = int(done.code or 0)
    return status, err.getvalue()


def spawn(
    args: list[str],
    preexec_fn: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gradflow.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, **(env or {})},
        preexec_fn=preexec_fn,
    )


def kill_after(proc: subprocess.Popen[str], line: re.Pattern[str], delay: float) -> list[str]:
    """SIGKILL ``proc`` ``delay`` s after it printed a line matching ``line``; all its lines."""
    assert proc.stdout is not None and proc.stderr is not None
    watchdog = threading.Timer(120, proc.kill)  # never wait forever on a stuck process
    watchdog.start()
    lines = []
    try:
        for text in proc.stdout:
            lines.append(text)
            if line.match(text):
                time.sleep(delay)
                break
        else:
            raise AssertionError(f"ended before {line.pattern!r}: {proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        lines += proc.stdout.read().splitlines(keepends=True)  # printed before it died
    finally:
        watchdog.cancel()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return lines


def check_rows(run: Run, spe: int = SPE) -> None:
    """Committed rows: contiguous from step 0, every array as long, data really written."""
    n = run.n_steps
    np.testing.assert_array_equal(run.steps, np.arange(n))
    np.testing.assert_array_equal(run.epoch, np.arange(n) // spe)
    for probe, stats in run.probes().items():
        for stat in stats:
            assert run.stat(probe, stat).shape == (n, run.n_layers), (probe, stat)
    for name in ("time", "loss", "scale", "skipped"):
        assert len(getattr(run, name)) == n, name
    assert np.isfinite(run.loss).all() and np.isfinite(run.stat("param", "grad_norm")).all()
    np.testing.assert_array_equal(run.epochs, np.arange(run.n_epochs))
    np.testing.assert_array_equal(run.epoch_end_step, (np.arange(run.n_epochs) + 1) * spe)
    assert run.stat("epoch", "update_norm").shape == (run.n_epochs, run.n_layers)
    assert np.isfinite(run.metrics.get("train_loss", np.zeros(0))).all()
    assert run.n_epochs <= n // SPE  # an epoch closes only after its steps


def assert_one_line_error(status: int, err: str, *messages: str) -> None:
    assert status == 2, err[-3000:]  # GradflowError's status; a crash is negative
    assert err.startswith("gradflow: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert any(m in err for m in messages), err


# -- 1. SIGKILL at random moments -----------------------------------------------------------------
def _kill_plans() -> list[tuple[str, int, float]]:
    """(line kind, its number, delay in s): fixed cases first, then seeded random ones."""
    rng = random.Random(2016)
    plans = [
        ("step", 0, 0.0),  # the first step: no row committed yet, maybe no file yet
        ("epoch", 0, 0.0),  # right after validation, the epoch flush and the checkpoint
        ("step", SPE - 1, rng.uniform(0.0, 0.06)),  # in validation / epoch flush / checkpoint
        ("step", 2 * SPE - 1, rng.uniform(0.0, 0.06)),
    ]
    for _ in range(6):  # during a step or a flush (every FLUSH rows)
        plans.append(("step", rng.randrange(1, TOTAL - 1), rng.uniform(0.0, 0.03)))
    return plans


KILLS = _kill_plans()


@pytest.mark.slow  # 10 processes of ~5 s (mostly imports)
@pytest.mark.parametrize(
    ("kind", "number", "delay"), KILLS, ids=[f"{k}{n}+{d * 1000:.0f}ms" for k, n, d in KILLS]
)
def test_sigkill_loses_at_most_the_unflushed_rows(
    em: Path, tmp_path: Path, kind: str, number: int, delay: float
) -> None:
    out = tmp_path / "run.h5"
    line = re.compile(rf"{kind} {number} ")
    lines = kill_after(spawn(record_args(em, out)), line, delay)
    printed = [int(m[1]) for m in map(STEP_LINE.match, lines) if m]
    last = max(printed, default=-1)
    closed = sum(1 for text in lines if EPOCH_LINE.match(text))
    assert printed == list(range(last + 1))
    if out.exists():  # never a partial file: complete (maybe without rows) or absent
        with open_run(out) as run:
            check_rows(run)
            assert run.events == []
            n, n_epochs = run.n_steps, run.n_epochs
    else:
        n, n_epochs = 0, 0
    assert last + 1 - (FLUSH + 2) <= n <= last + 1, (last, n)
    assert n_epochs >= closed and n >= closed * SPE
    ckpt = checkpoint_path(out)
    if ckpt.exists():
        saved = load_checkpoint(ckpt)
        assert closed <= saved.epoch <= n_epochs and saved.step == saved.epoch * SPE
    else:
        assert closed == 0


# -- 2. resume after a kill -----------------------------------------------------------------------
def assert_same_run(resumed: Run, straight: Run) -> None:
    np.testing.assert_array_equal(resumed.steps, np.arange(straight.n_steps))
    np.testing.assert_array_equal(resumed.epochs, np.arange(EPOCHS))
    assert resumed.probes() == straight.probes() and resumed.epoch_stats() == straight.epoch_stats()
    for probe, stats in straight.probes().items():
        for stat in stats:
            np.testing.assert_allclose(
                resumed.stat(probe, stat), straight.stat(probe, stat), rtol=1e-6, err_msg=stat
            )
    for stat in straight.epoch_stats():
        np.testing.assert_allclose(
            resumed.stat("epoch", stat), straight.stat("epoch", stat), rtol=1e-6, err_msg=stat
        )
    assert resumed.metrics.keys() == straight.metrics.keys()
    for name, values in straight.metrics.items():
        np.testing.assert_allclose(resumed.metrics[name], values, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(resumed.loss, straight.loss, rtol=1e-6)


def test_resume_after_kill_mid_epoch_equals_an_uninterrupted_run(
    em: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run.h5"
    # --flush-every 1: rows past the checkpoint (step SPE) are surely committed (bound above)
    kill_after(spawn(record_args(em, out, "--flush-every", "1")), re.compile(r"step 11 "), 0.0)
    saved = load_checkpoint(checkpoint_path(out))
    assert (saved.epoch, saved.step) == (1, SPE)
    with open_run(out) as killed:
        assert killed.n_steps > SPE and killed.n_epochs == 1
    status, err = gradflow(*record_args(em, out, "--resume"))
    assert status == 0, err
    with open_run(out) as resumed, open_run(reference) as straight:
        assert [(e.kind, e.step, e.epoch) for e in resumed.events] == [("resume", SPE, 1)]
        assert_same_run(resumed, straight)
    saved = load_checkpoint(checkpoint_path(out))
    assert (saved.epoch, saved.step) == (EPOCHS, TOTAL)


# -- 3. unwritable output, full disk --------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("nodir/run.h5", "directory {tmp}/nodir does not exist"),
        ("file.txt/run.h5", "{tmp}/file.txt is not a directory"),
        ("adir", "{tmp}/adir: is a directory"),
        ("readonly/run.h5", "directory {tmp}/readonly is not writable"),
    ],
)
@pytest.mark.parametrize("force", [False, True])
def test_unwritable_out_is_one_error_line(
    em: Path, tmp_path: Path, where: str, message: str, force: bool
) -> None:
    (tmp_path / "file.txt").write_text("keep\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "readonly").mkdir(mode=0o555)
    if where.startswith("readonly") and os.access(tmp_path / "readonly", os.W_OK):
        pytest.skip("running as root: a mode 555 directory stays writable")
    before = sorted(tmp_path.rglob("*"))
    extra = ["--force"] if force else []
    status, err = gradflow(*record_args(em, tmp_path / where, *extra))
    assert_one_line_error(status, err, message.format(tmp=tmp_path))
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "file.txt").read_text() == "keep\n"


def file_size_limit(limit: int) -> Callable[[], None]:
    """For ``preexec_fn``: writes past ``limit`` bytes fail with EFBIG, like a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def record_on_full_disk(args: list[str], limit: int) -> tuple[int, str]:
    """``gradflow record`` in a process whose files cannot grow past ``limit`` bytes."""
    import matplotlib.font_manager  # noqa: F401  (its cache is built here, not under the limit)

    # The C kernels are loaded from a private copy (gradflow.usercache.open_library), which
    # a 16 KB file-size limit forbids: that is its own warning; these tests are about the run
    # file, so they record with torch operations.
    proc = spawn(args, file_size_limit(limit), env={"GRADFLOW_NATIVE": "0"})
    _, err = proc.communicate(timeout=120)  # a hang fails the test
    return proc.returncode, err


def test_disk_full_while_creating_keeps_the_old_run_file(
    em: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run.h5"
    shutil.copy(reference, out)
    before = out.read_bytes()
    status, err = record_on_full_disk(record_args(em, out, "--force"), 16_000)
    assert_one_line_error(status, err, "cannot write the run file (File too large)")
    assert out.read_bytes() == before  # the new file was never renamed over it
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]  # no temporary left


def test_disk_full_while_resuming_keeps_the_run_file(
    em: Path, reference: Path, tmp_path: Path
) -> None:
    """``--resume`` copies the rows to keep into a new file: the copy fails, not the run."""
    out = tmp_path / "run.h5"
    shutil.copy(reference, out)
    shutil.copy(checkpoint_path(reference), checkpoint_path(out))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = record_args(em, out, "--epochs", str(EPOCHS + 1), "--resume")
    status, err = record_on_full_disk(args, 40_000)
    assert_one_line_error(status, err, f"{out}: cannot rewrite the run file")
    assert "File too large" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary


def record_until_disk_full(args: list[str], out: Path) -> tuple[int, str]:
    """``gradflow record`` whose disk fills up once its first checkpoint exists: from then
    on no file of the process may grow past the run file's size at that moment."""
    proc = spawn(args, file_size_limit(resource.RLIM_INFINITY))
    checkpoint = checkpoint_path(out)
    while proc.poll() is None and not checkpoint.exists():
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    limit = out.stat().st_size
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    _, err = proc.communicate(timeout=120)  # a hang fails the test
    return proc.returncode, err


def test_disk_full_mid_run_keeps_the_committed_rows_and_resumes(em: Path, tmp_path: Path) -> None:
    """The live file's chunks hold 128 rows, so a run of 3 x 50 steps grows its file in its
    third epoch, after two checkpoints: that growth meets the full disk."""
    spe = 50
    args = ["--steps-per-epoch", str(spe), "--val-every", "0"]
    straight = tmp_path / "straight.h5"
    status, err = gradflow(*record_args(em, straight, *args))
    assert status == 0, err
    out = tmp_path / "run.h5"
    started = time.monotonic()
    status, err = record_until_disk_full(record_args(em, out, *args), out)
    assert time.monotonic() - started < 60  # no flush waiting out its timeout
    assert_one_line_error(status, err, "run file failed: File too large")
    with open_run(out) as run:
        check_rows(run, spe)
        assert 2 * spe <= run.n_steps < EPOCHS * spe
    # With space again, the run continues from its last checkpoint to the same end.
    saved = load_checkpoint(checkpoint_path(out))
    assert saved.epoch == 2
    status, err = gradflow(*record_args(em, out, *args, "--resume"))
    assert status == 0, err
    with open_run(out) as resumed, open_run(straight) as run:
        assert [(e.kind, e.step) for e in resumed.events] == [("resume", saved.step)]
        assert_same_run(resumed, run)


# -- 4. non-finite values -------------------------------------------------------------------------
def test_nonfinite_continue_trains_every_epoch_and_records_the_first_step(
    em: Path, tmp_path: Path
) -> None:
    """(``stop`` at the CLI: test_cli_record; ``continue`` there runs a single epoch.)"""
    out = tmp_path / "nan.h5"
    args = record_args(em, out, "--lr", "1e30", "--epochs", "2", "--on-nonfinite", "continue")
    status, err = gradflow(*args)
    assert status == 0, err
    with open_run(out) as run:
        np.testing.assert_array_equal(run.steps, np.arange(2 * SPE))
        np.testing.assert_array_equal(run.epochs, [0, 1])
        event = run.first_nonfinite
        assert event is not None and (event.step, event.epoch) == (1, 0)
        assert event.layer == "down1.conv"
        assert [e.kind for e in run.events] == ["nonfinite"]  # only the first one


# -- 5. bad run files -----------------------------------------------------------------------------
BAD_FILES = {
    "missing": "no such run file",
    "empty": "empty file, not a gradflow run",
    "truncated": "damaged or truncated HDF5 file",
    "text": "not an HDF5 file",
    "foreign": "an HDF5 file, but not a gradflow run",
    "newer": f"written with run-file schema v{SCHEMA_VERSION + 1}; this gradflow reads up to",
}


def bad_file(kind: str, path: Path, good: Path) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":  # a partial copy
        path.write_bytes(good.read_bytes()[:6000])
    elif kind == "text":
        path.write_text("step,loss\n0,0.5\n")
    elif kind == "foreign":
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=np.arange(3))
    elif kind == "newer":
        shutil.copy(good, path)
        with h5py.File(path, "r+") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION + 1
    return path


COVERED = {("plot", "missing"), ("plot", "text"), ("info", "text")}  # test_cli_plot
FAST = [k for k in BAD_FILES if k != "truncated"]  # truncated: see the test after the next


@pytest.mark.parametrize(
    ("command", "kind"),
    [(c, k) for c in ("plot", "info") for k in FAST if (c, k) not in COVERED],
)
def test_bad_run_file_for_plot_and_info(
    reference: Path, tmp_path: Path, command: str, kind: str
) -> None:
    path = bad_file(kind, tmp_path / "bad.h5", reference)
    before = path.read_bytes() if path.exists() else None
    figure = tmp_path / "f.png"
    args = ["plot", "gradient-heatmap", path, "-o", figure] if command == "plot" else ["info", path]
    status, err = gradflow(*args)
    assert_one_line_error(status, err, f"{path}: {BAD_FILES[kind]}")
    assert (path.read_bytes() if path.exists() else None) == before
    assert not figure.exists()


def test_truncated_run_file_fails_fast(reference: Path, tmp_path: Path) -> None:
    path = bad_file("truncated", tmp_path / "partial.h5", reference)
    done = subprocess.run(
        [sys.executable, "-m", "gradflow.cli.main", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=15,
        env=ENV,
    )
    assert_one_line_error(done.returncode, done.stderr, f"{path}: {BAD_FILES['truncated']}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["learning-curves", "--stat", "v_rnd"], "did you mean 'v_rand'"),
        (["gradient-heatmap", "--stat", "param/grad_nrom"], "did you mean 'param/grad_norm'"),
        (["gradient-heatmap", "--layers", "down[", "--all-layers"], "'down[' matches no layer"),
    ],
    ids=["metric", "step-statistic", "invalid-regex"],
)
def test_bad_plot_choices_on_a_real_run(
    reference: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    """Names the other tests try on synthetic files, here on a file `gradflow record` wrote."""
    before = reference.read_bytes()
    figure, *options = args
    status, err = gradflow("plot", figure, reference, "-o", tmp_path / "f.png", *options)
    assert_one_line_error(status, err, message)
    assert reference.read_bytes() == before and not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("kind", FAST)
def test_resume_on_a_damaged_run_file(em: Path, reference: Path, tmp_path: Path, kind: str) -> None:
    """The checkpoint is good and matches: only the run file is bad."""
    out = bad_file(kind, tmp_path / "run.h5", reference)
    shutil.copy(checkpoint_path(reference), checkpoint_path(out))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    status, err = gradflow(*record_args(em, out, "--epochs", str(EPOCHS + 1), "--resume"))
    assert_one_line_error(status, err, f"{out}: {BAD_FILES[kind]}")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
