"""Every file gradflow writes (figures, tables, the report, checkpoints) is made under a
name nobody can predict, in a fresh file that never follows a link, and renamed into place.

An attacker who can write to the output folder plants symbolic links at every name a
writer could predict (``.OUT.tmp``, ``.OUT.tmp-PID``) and at the output name itself,
pointing at files of the victim; none of those files may change, byte or mtime.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from runfiles import write_run

from gradflow.em.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gradflow.errors import GradflowError
from gradflow.plots import save
from gradflow.report import build_report
from gradflow.runfile import open_run


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("run") / "a.h5", epochs=2)


def _predictable(out: Path) -> list[Path]:
    """Every temporary name a writer could derive from the output name and this process."""
    pid = os.getpid()
    names = [f".{out.name}.tmp", f".{out.name}.tmp-{pid}", f"{out.name}.tmp", f".{out.name}"]
    return [out.with_name(name) for name in names]


class Victims:
    """Files an attacker wants overwritten, and links to them at every predictable name."""

    def __init__(self, folder: Path, out: Path) -> None:
        self.folder = folder / "victim"
        self.folder.mkdir()
        self.links: dict[Path, Path] = {}
        for i, link in enumerate([*_predictable(out), out]):
            target = self.folder / f"secret-{i}"
            target.write_bytes(f"secret {i}\n".encode())
            os.utime(target, ns=(1_000_000_000, 1_000_000_000))
            link.symlink_to(target)
            self.links[link] = target
        self.before = self.snapshot()

    def snapshot(self) -> dict[Path, tuple[bytes, int]]:
        return {t: (t.read_bytes(), t.stat().st_mtime_ns) for t in self.links.values()}

    def untouched(self) -> bool:
        return self.snapshot() == self.before


def _checkpoint() -> Checkpoint:
    return Checkpoint(
        model={"w": torch.arange(6.0)},
        optimizer={"state": {}, "param_groups": []},
        epoch=1,
        step=2,
        config={"lr": 0.001},
    )


def _figure(name: str) -> Callable[[Path, Path], object]:
    def write(run: Path, out: Path) -> object:
        with open_run(run) as opened:
            return save(name, [opened], out, force=True)

    return write


# Each writer of an output file, as the command line and the API call it.
WRITERS: dict[str, tuple[str, Callable[[Path, Path], object]]] = {
    "figure png": ("fig.png", _figure("gradient-heatmap")),
    "figure svg": ("fig.svg", _figure("learning-curves")),
    "table csv": ("table.csv", _figure("best-losses")),
    "table md": ("table.md", _figure("best-losses")),
    "report": ("report.html", lambda run, out: build_report([run], out, force=True)),
    "checkpoint": ("a.h5.ckpt.pt", lambda run, out: save_checkpoint(out, _checkpoint())),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_planted_links_are_never_followed(writer: str, run_file: Path, tmp_path: Path) -> None:
    name, write = WRITERS[writer]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / name
    victims = Victims(tmp_path, out)
    write(run_file, out)
    assert victims.untouched(), f"{writer} wrote through a planted link"
    # The output is a new regular file that replaced the link, and nothing else is left.
    assert stat.S_ISREG(out.lstat().st_mode) and out.stat().st_size > 0
    assert {p for p in out_dir.iterdir()} == {out, *(_predictable(out))}
    assert all(p.is_symlink() for p in _predictable(out))


@pytest.mark.parametrize("writer", list(WRITERS))
def test_temporary_names_cannot_be_predicted(
    writer: str, run_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two writes of the same output in the same process must use different temporary
    # names, none of them derivable from the output name or the process id.
    name, write = WRITERS[writer]
    renamed: list[str] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw: object) -> None:
        renamed.append(os.fspath(src))
        real_replace(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / name
    write(run_file, out)
    write(run_file, out)
    assert len(renamed) == 2 and renamed[0] != renamed[1]
    for used in renamed:
        assert Path(used).parent.parent == tmp_path or Path(used).parent == tmp_path
        assert Path(used) not in _predictable(out)
        assert str(os.getpid()) not in Path(used).name


def test_atomic_write_is_all_or_nothing_and_keeps_the_umask(tmp_path: Path) -> None:
    from gradflow.safefile import atomic_write

    out = tmp_path / "x.txt"
    old = os.umask(0o027)
    try:
        with atomic_write(out) as f:
            f.write(b"first")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"first" and stat.S_IMODE(out.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError), atomic_write(out) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert out.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_path_gives_a_name_in_a_private_folder_for_hdf5(tmp_path: Path) -> None:
    from gradflow.safefile import atomic_path

    out = tmp_path / "run.h5"
    with atomic_path(out) as path:
        folder = path.parent
        assert folder.parent == tmp_path and stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert path.is_file() and path.stat().st_size == 0  # made, empty, by this process
        with h5py.File(path, "w") as f:
            f["x"] = np.arange(3)
    with h5py.File(out, "r") as f:
        assert f["x"][()].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]
    # A name swapped for a link inside the private folder (only root could) is refused.
    with pytest.raises(OSError), atomic_path(out) as path:
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere")
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]


def test_checkpoint_write_errors_are_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    with pytest.raises(GradflowError, match="cannot write the checkpoint"):
        save_checkpoint(folder / "a.ckpt.pt", _checkpoint())
    save_checkpoint(tmp_path / "a.ckpt.pt", _checkpoint())
    assert load_checkpoint(tmp_path / "a.ckpt.pt").step == 2
