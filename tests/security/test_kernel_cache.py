"""The per-user kernel cache holds code that gradflow loads: a library there is used only
when nobody but the user can have put it there.

A planted library announces itself: its constructor (run by the dynamic loader before
anything else) writes a marker file. In every unsafe place below the marker must stay
absent, and the kernels must still come from a fresh private build (no warning).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gradflow import usercache
from gradflow.kernels import cpu

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fputs("loaded\n", f); fclose(f); }
}
"""
Choose = Callable[[Path], tuple[str, list[warnings.WarningMessage]]]


@pytest.fixture(scope="module")
def portable_cc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cc`` building without run-time dispatch: a fifth of the compile time."""
    wrapper = tmp_path_factory.mktemp("cc") / "portable-cc"
    wrapper.write_text('#!/bin/sh\nexec cc -DGRADFLOW_PORTABLE "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.fixture(scope="module")
def cache_name(tmp_path_factory: pytest.TempPathFactory, portable_cc: Path) -> str:
    """The file name the cache gives the library for this compiler and source."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CC", str(portable_cc))
        path, why = cpu.build_cached(tmp_path_factory.mktemp("learn-name"))
    assert path is not None, why
    return path.name


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A library whose loading writes ``marker``, and the marker's path."""
    marker = tmp_path / "marker"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    library = tmp_path / "planted.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(library)],
        check=True,
    )
    return library, marker


@pytest.fixture
def choose(monkeypatch: pytest.MonkeyPatch, portable_cc: Path) -> Iterator[Choose]:
    """The process's choice of kernels, made afresh with the cache at a given folder."""
    monkeypatch.setattr(cpu, "extension_path", lambda: None)
    monkeypatch.delenv("GRADFLOW_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(portable_cc))

    def run(folder: Path) -> tuple[str, list[warnings.WarningMessage]]:
        monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(folder))
        cpu._library.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = cpu.cpu_backend()
        return backend, caught

    yield run
    cpu._library.cache_clear()


def _plant(library: Path, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copyfile(library, target)
    target.chmod(0o755)
    return target


def _group_writable_folder(tmp: Path, library: Path, name: str) -> Path:
    folder = tmp / "cache"
    _plant(library, folder, name)
    folder.chmod(0o770)
    return folder


def _group_writable_parent(tmp: Path, library: Path, name: str) -> Path:
    folder = tmp / "shared" / "cache"
    _plant(library, folder, name)
    folder.chmod(0o700)
    (tmp / "shared").chmod(0o777)  # anyone may rename the cache folder away and back
    return folder


def _linked_library(tmp: Path, library: Path, name: str) -> Path:
    folder = tmp / "cache"
    folder.mkdir(mode=0o700, parents=True)
    (folder / name).symlink_to(library)
    return folder


def _writable_library(tmp: Path, library: Path, name: str) -> Path:
    folder = tmp / "cache"
    folder.mkdir(mode=0o700)
    _plant(library, folder, name).chmod(0o777)
    return folder


def _library_of_another_user(tmp: Path, library: Path, name: str) -> Path:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    folder = tmp / "cache"
    folder.mkdir(mode=0o700)
    os.chown(_plant(library, folder, name), 65534, 65534)
    return folder


PLACES = {
    "group-writable cache folder": _group_writable_folder,
    "group-writable parent folder": _group_writable_parent,
    "symbolic link at the library's name": _linked_library,
    "library writable by others": _writable_library,
    "library owned by another user": _library_of_another_user,
}


@pytest.mark.parametrize("place", list(PLACES))
def test_a_planted_library_is_never_loaded(
    place: str,
    tmp_path: Path,
    planted: tuple[Path, Path],
    cache_name: str,
    choose: Choose,
) -> None:
    library, marker = planted
    folder = PLACES[place](tmp_path, library, cache_name)
    backend, caught = choose(folder)
    assert not marker.exists(), f"the library planted in a {place} was loaded"
    # The kernels come from a private build instead, without the fallback's warning.
    assert backend == "c-private" and caught == []


def test_a_safe_cache_is_used_and_stays_private(tmp_path: Path, choose: Choose) -> None:
    folder = tmp_path / "home" / "cache"
    assert choose(folder)[0] == "c-cached"
    (built,) = folder.iterdir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and built.stat().st_uid == os.geteuid()
    assert not stat.S_IMODE(built.stat().st_mode) & 0o022
    assert choose(folder)[0] == "c-cached"  # and loaded again by the next process


def test_unsafe_places_are_named(
    tmp_path: Path, planted: tuple[Path, Path], cache_name: str
) -> None:
    library, _ = planted
    assert usercache.unsafe_folder(tmp_path) == ""
    folder = _group_writable_parent(tmp_path, library, cache_name)
    assert usercache.unsafe_folder(folder) == f"{tmp_path / 'shared'} can be written by other users"
    path, why = cpu.build_cached(folder)
    assert path is None and why == f"{tmp_path / 'shared'} can be written by other users"
    assert cpu.load(_linked_library(tmp_path / "l", library, cache_name) / cache_name) is None
