"""Compiling gradflow's native libraries into a per-user cache folder, safely: the C
kernels (:mod:`gradflow.kernels.cpu`) and the output-gradient hooks
(:mod:`gradflow.kernels.prehook`).

A library is built once under a name keyed by its source, the compiler and every flag,
into a folder that no other user can write to (:func:`gradflow.usercache.unsafe_folder`).
The compiler runs in its own process group, without input and with a timeout, into a
temporary file that is renamed into place: processes building at once each leave a
complete library, and none ever loads a partial one.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from gradflow.usercache import unsafe_folder

COMPILE_TIMEOUT_S = 120
_RUNNING: set[subprocess.Popen[bytes]] = set()  # compilers running now, in any thread


@atexit.register
def _stop_compilers() -> None:
    """Stop the compilers of builds still running as the process exits (a build in a
    background thread): an orphaned compiler would take a core for nothing."""
    for process in list(_RUNNING):
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)


def _compile(args: Sequence[str], folder: Path) -> None:
    """Run the compiler in its own process group, without input, with a timeout; raises
    :class:`subprocess.CalledProcessError` where it fails."""
    process = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=folder,
        start_new_session=True,
    )
    _RUNNING.add(process)
    try:
        _, err = process.communicate(timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        _RUNNING.discard(process)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, args, stderr=err)


class Refused(Exception):
    """This folder cannot hold the library; a private one can."""


class Failed(Exception):
    """No folder can: no compiler, no source, or the compiler fails."""


def cache_key(source: bytes, command: Sequence[str]) -> str:
    """The cached library's key: any change of source, compiler, flags or machine type
    gives another file."""
    digest = hashlib.sha256(source)
    for part in (*command, platform.machine()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:24]


def compiler(variable: str, default: str, language: str) -> list[str]:
    """The compiler named by the environment ``variable`` (else ``default``) and its own
    arguments, its path resolved; raises :class:`Failed` where it is not found."""
    named = os.environ.get(variable) or default
    try:
        words = shlex.split(named)
    except ValueError:
        words = []
    found = shutil.which(words[0]) if words else None
    if found is None:
        raise Failed(f"no {language} compiler: {named} not found")
    return [found, *words[1:]]


def library_path(
    folder: Path, command: Sequence[str], source: Path, stem: str, link: Sequence[str] = ()
) -> Path:
    """Where :func:`build` puts the library of these arguments (see there)."""
    return folder / f"{stem}-{cache_key(source.read_bytes(), [*command, *link])}.so"


def build(
    folder: Path, command: Sequence[str], source: Path, stem: str, link: Sequence[str] = ()
) -> Path:
    """The library ``<stem>-<key>.so`` in ``folder``, compiled from ``source`` by
    ``command`` first if missing.

    Args:
        folder: the cache folder (made with mode 0700 where missing).
        command: the compiler and its flags (the source and the output follow them).
        source: the source file.
        stem: the start of the library's name.
        link: libraries to link, after the source (where linkers drop those unused so far).

    Returns:
        The library's path (what it holds is for the loader to check).

    Raises:
        Refused: ``folder`` cannot be made or another user could write to it.
        Failed: the source is missing, or the compiler fails or takes too long.
    """
    if not source.is_file():
        raise Failed(f"{source} is missing (reinstall gradflow)")
    target = library_path(folder, command, source, stem, link)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise Refused(f"cannot use the cache directory {folder}: {err.strerror or err}") from None
    unsafe = unsafe_folder(folder)
    if unsafe:
        raise Refused(unsafe)
    if os.path.lexists(target):
        return target
    try:
        fd, partial = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
        os.close(fd)
    except OSError as err:
        raise Refused(f"cannot use the cache directory {folder}: {err.strerror or err}") from None
    try:
        _compile([*command, str(source), "-o", partial, *link], folder)
        os.replace(partial, target)
    except subprocess.CalledProcessError as err:
        last = (err.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        why = last[0] if last else f"status {err.returncode}"
        raise Failed(f"{command[0]} failed: {why}") from None
    except subprocess.TimeoutExpired:
        raise Failed(f"{command[0]} took more than {COMPILE_TIMEOUT_S} s") from None
    except OSError as err:
        raise Failed(f"{command[0]} could not run: {err.strerror or err}") from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target
