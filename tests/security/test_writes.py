"""Writing run files in folders others may write to: planted symbolic links and hard links.

A run file is made under a name nobody can predict and renamed into place; the lock file
is only written when it is a regular file of this user with one name. Every test plants
links at the names a writer used to write through and checks that the files they lead to
stay byte-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from runfiles import SyntheticRun, fcn_layers, write_run

from gradflow import open_run
from gradflow.cli.main import main
from gradflow.errors import GradflowError
from gradflow.runfile import RunWriter, lock_path

PRECIOUS = b"do not overwrite me\n" * 10


def _victim(folder: Path, name: str = "precious") -> Path:
    folder.mkdir(exist_ok=True)
    victim = folder / name
    victim.write_bytes(PRECIOUS)
    return victim


def _plant_tmp_links(run: Path, victim: Path) -> list[Path]:
    """Symbolic links at the temporary names writers used: ``.NAME.tmp-PID``."""
    links = [run.with_name(f".{run.name}.tmp-{os.getpid()}")]
    for link in links:
        link.symlink_to(victim)
    return links


def _only_run_files(folder: Path, run: Path, planted: list[Path]) -> None:
    """Nothing is left in ``folder`` but the run, the planted links and the victim's folder
    (no temporary file, no lock file)."""
    left = {p.name for p in folder.iterdir()} - {p.name for p in planted}
    assert left == {run.name, "elsewhere"}, left


def test_creation_and_compaction_never_write_through_planted_links(tmp_path: Path) -> None:
    victim = _victim(tmp_path / "elsewhere")
    run = tmp_path / "run.h5"
    planted = _plant_tmp_links(run, victim)
    write_run(run, epochs=2, steps_per_epoch=3)  # create, then compact at close
    assert victim.read_bytes() == PRECIOUS
    assert not run.is_symlink()
    with open_run(run) as r:
        assert r.n_steps == 6 and r.n_epochs == 2
        assert r._f["steps"].compression == "gzip"  # the compaction ran
    _only_run_files(tmp_path, run, planted)


def test_force_replaces_a_link_at_the_output_and_never_follows_it(tmp_path: Path) -> None:
    victim = _victim(tmp_path / "elsewhere")
    run = tmp_path / "run.h5"
    run.symlink_to(victim)
    planted = _plant_tmp_links(run, victim)
    with pytest.raises(GradflowError, match="file exists"):
        RunWriter.create(run, layers=fcn_layers(), step_stats={}, epoch_stats=[], config={})
    write_run(run, epochs=1, steps_per_epoch=2)  # overwrite=True
    assert victim.read_bytes() == PRECIOUS
    assert not run.is_symlink() and open_run(run).n_steps == 2
    _only_run_files(tmp_path, run, planted)


def test_resume_rewrite_never_writes_through_planted_links(tmp_path: Path) -> None:
    victim = _victim(tmp_path / "elsewhere")
    run = write_run(tmp_path / "run.h5", epochs=2, steps_per_epoch=3)
    planted = _plant_tmp_links(run, victim)
    writer = RunWriter.resume(run, keep_steps_below=3, keep_epochs=1)
    writer.close()
    assert victim.read_bytes() == PRECIOUS
    assert open_run(run).n_steps == 3
    _only_run_files(tmp_path, run, planted)


def _one_line(err: pytest.ExceptionInfo[GradflowError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_hard_linked_lock_file_is_never_truncated(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    run = tmp_path / "run.h5"
    os.link(victim, lock_path(run))
    with pytest.raises(GradflowError, match=r"refused: the lock file .* hard link") as err:
        SyntheticRun(run, fcn_layers())
    _one_line(err)
    assert victim.read_bytes() == PRECIOUS and not run.exists()


def test_a_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    victim = _victim(tmp_path / "elsewhere")
    run = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=2)
    before = run.read_bytes()
    lock_path(run).symlink_to(victim)
    with pytest.raises(GradflowError, match=r"refused: the lock file .* symbolic link") as err:
        RunWriter.resume(run, keep_steps_below=1, keep_epochs=0)
    _one_line(err)
    assert victim.read_bytes() == PRECIOUS and run.read_bytes() == before


def test_a_lock_file_of_another_user_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run.h5"
    lock_path(run).write_bytes(b"")
    try:
        os.chown(lock_path(run), os.geteuid() + 1, -1)
    except PermissionError:
        pytest.skip("cannot give a file to another user without root")
    with pytest.raises(GradflowError, match=r"refused: the lock file .* belongs to user"):
        SyntheticRun(run, fcn_layers())
    assert not run.exists()


def test_resume_refuses_a_hard_linked_lock_file(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    run = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=2)
    before = run.read_bytes()
    os.link(victim, lock_path(run))
    with pytest.raises(GradflowError, match=r"refused: the lock file .* hard link") as err:
        RunWriter.resume(run, keep_steps_below=1, keep_epochs=0)
    _one_line(err)
    assert victim.read_bytes() == PRECIOUS and run.read_bytes() == before


def test_record_refuses_a_hard_linked_lock_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _victim(tmp_path)
    run = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=2)
    before = run.read_bytes()
    os.link(victim, lock_path(run))
    args = ["record", "--model", "tiny", "--epochs", "1", "--steps-per-epoch", "1",
            "--crop", "32", "--batch-size", "1", "--out", str(run), "--force"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradflow: error: "), err
    assert "hard link" in err[0]
    assert victim.read_bytes() == PRECIOUS and run.read_bytes() == before
