"""``record --resume`` rewrites a run file: it copies only the schema's datasets.

Anything else a crafted file holds (external storage in another local file or a FIFO, an
unallocated dataset of 8 x 10^8 values, unknown groups) is refused in one line before
anything is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from runfiles import write_run

from gradflow.errors import GradflowError
from gradflow.runfile import RunWriter, open_run


def _external_file(f: h5py.File, folder: Path) -> None:
    secret = folder / "secret.bin"
    secret.write_bytes(b"private bytes\n" * 8)
    f.create_dataset("notes", shape=(16,), dtype="S7", external=[(str(secret), 0, 112)])


def _unallocated(f: h5py.File, folder: Path) -> None:
    f.create_dataset("stats_backup", shape=(8 * 10**8,), dtype=np.float64)


def _unknown_group(f: h5py.File, folder: Path) -> None:
    f.create_dataset("extra/deeper/table", data=np.arange(10))


def _unknown_in_schema_group(f: h5py.File, folder: Path) -> None:
    f["scalars/hidden"] = np.arange(3)


CRAFTS: dict[str, tuple[Callable[[h5py.File, Path], None], str]] = {
    "external storage": (_external_file, "notes"),
    "unallocated 8e8 values": (_unallocated, "stats_backup"),
    "unknown group": (_unknown_group, "extra"),
    "unknown member of /scalars": (_unknown_in_schema_group, "scalars/hidden"),
}


def _crafted(folder: Path, craft: Callable[[h5py.File, Path], None]) -> Path:
    run = write_run(folder / "run.h5", epochs=2, steps_per_epoch=3)
    with h5py.File(run, "a") as f:
        craft(f, folder)
    open_run(run).close()  # a reader accepts it: only the rewrite must refuse it
    return run


@pytest.mark.parametrize("case", list(CRAFTS))
def test_resume_refuses_anything_but_the_schema_before_writing(tmp_path: Path, case: str) -> None:
    craft, name = CRAFTS[case]
    run = _crafted(tmp_path, craft)
    before = run.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(GradflowError, match=f"refused: /{name} is not part of a run file") as e:
        RunWriter.resume(run, keep_steps_below=3, keep_epochs=1)
    assert "\n" not in str(e.value)
    assert run.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary, no lock


def test_resume_copies_the_schema_datasets(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run.h5", epochs=2, steps_per_epoch=3)
    with open_run(run) as r:
        steps, stats, loss = r.steps[:3], r.stat("param", "update_ratio")[:3], r.loss[:3]
        datasets = set(r._layout.datasets)
    RunWriter.resume(run, keep_steps_below=int(steps[-1]) + 1, keep_epochs=1).close()
    with open_run(run) as r:
        assert set(r._layout.datasets) == datasets and r.n_epochs == 1
        np.testing.assert_array_equal(r.steps, steps)
        np.testing.assert_array_equal(r.loss, loss)
        np.testing.assert_array_equal(r.stat("param", "update_ratio"), stats)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_resume_refuses_external_storage_in_a_fifo_within_seconds(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=3)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with h5py.File(run, "a") as f:
        f.create_dataset("pipe", shape=(1000,), dtype="u1", external=[(str(fifo), 0, 1000)])
    before = run.read_bytes()
    script = (
        "import sys\n"
        "from gradflow.errors import GradflowError\n"
        "from gradflow.runfile import RunWriter\n"
        "try:\n"
        "    RunWriter.resume(sys.argv[1], keep_steps_below=1, keep_epochs=0)\n"
        "except GradflowError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(run)], capture_output=True, text=True, timeout=30
    )
    assert "refused: /pipe is not part of a run file" in done.stdout, done.stderr
    assert run.read_bytes() == before


def test_resume_refuses_a_copy_the_disk_cannot_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = write_run(tmp_path / "run.h5", epochs=2, steps_per_epoch=3)
    before = run.read_bytes()
    usage = type("Usage", (), {"free": 1000})
    monkeypatch.setattr("gradflow.runfile.write.shutil.disk_usage", lambda _: usage)
    with pytest.raises(GradflowError, match=r"cannot rewrite the run file \(\d+ bytes needed"):
        RunWriter.resume(run, keep_steps_below=3, keep_epochs=1)
    assert run.read_bytes() == before
