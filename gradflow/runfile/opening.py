"""Opening a run file from anyone without hanging: plain read mode unless a writer has it
open, bounded SWMR metadata retries, and a first check in a time-limited child process.
See :mod:`gradflow.runfile.validate` for what is checked. This module does not import torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import h5py
from h5py._objects import phil

from gradflow.errors import GradflowError
from gradflow.runfile.validate import printable

# 20 attempts sleep at most 2**20 ns (1 ms) in all; HDF5's default of 100 doubles its sleep
# up to hours. A live writer's torn metadata read is over within microseconds.
SWMR_READ_ATTEMPTS = 20
PROBE_SECONDS = 8.0  # of the 10 s in which any file gets an answer

_FORK = hasattr(os, "fork")


def open_hdf5(path: Path) -> h5py.File:
    """Open ``path`` for reading; plain mode unless its superblock marks it open by a writer.

    Raises ``OSError`` from HDF5 for a file it cannot open (the caller words it).
    """
    with open(path, "rb") as fh:
        head = fh.read(36)
    # Superblock v2/v3 (what gradflow writes): byte 11 holds the file consistency flags,
    # bit 0 "open for writing", bit 2 "open for SWMR writing" (also left by a killed writer).
    # No HDF5 file lock: a reader must never keep a writer from opening the file.
    if len(head) < 12 or head[8] < 2:
        return h5py.File(path, "r", locking=False)
    if head[11] & 0b101:
        return _open_swmr(path)
    # A file cut short by a full disk, shorter than the end of file stored at byte 28, opens
    # only in SWMR mode, which does not check the end of file; its metadata must then read.
    eof = int.from_bytes(head[28:36], "little") if len(head) == 36 and head[9] == 8 else 0
    size = path.stat().st_size
    if size >= eof:
        return h5py.File(path, "r", locking=False)
    try:
        f = _open_swmr(path)
    except OSError:
        raise OSError(f"truncated file: {size} of {eof} bytes") from None
    try:
        f.visititems(lambda name, obj: None)
        f["counts"][()]
    except (OSError, KeyError, RuntimeError, ValueError):
        f.close()
        raise OSError(f"truncated file: {size} of {eof} bytes") from None
    return f


def _open_swmr(path: Path) -> h5py.File:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    # No sieve buffer: it would keep serving the name lists as first read, while the
    # writer fills them in place (they are small, read once per refresh).
    fapl.set_sieve_buf_size(0)
    fapl.set_file_locking(False, True)
    setter = _read_attempts_setter()  # without it, the caller's time limit (in_child) applies
    if setter is not None and setter(fapl.id, SWMR_READ_ATTEMPTS) < 0:
        raise OSError("cannot limit HDF5's metadata read attempts")
    flags = h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))


@functools.cache
def _read_attempts_setter() -> Callable[[int, int], int] | None:
    """HDF5's ``H5Pset_metadata_read_attempts`` (h5py does not wrap it), looked up through
    h5py's own extension module so that it is the HDF5 library h5py uses; ``None`` where the
    platform's loader does not resolve a module's dependencies that way."""
    try:
        function = ctypes.CDLL(h5py.h5p.__file__).H5Pset_metadata_read_attempts
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def in_child(path: Path, check: Callable[[Path], None], target: str) -> None:
    """Run ``check(path)`` first in a child process that is killed after
    :data:`PROBE_SECONDS`, and raise its :class:`GradflowError` here.

    HDF5 can loop forever, or crash, on some damaged metadata (plain mode too: one file in
    about a thousand byte-flipped ones looped while its attributes were read), in C code
    that Ctrl-C cannot stop. What the child got through, this process then repeats safely.
    The child is a fork where the platform has one (fast: nothing is imported), else a
    fresh, isolated interpreter (``-I``: no current directory or user site on its path)
    that runs ``target`` (``"module:function"``, the same check by name).
    """
    answer = _forked(path, check) if _FORK else _spawned(path, target)
    if answer:
        raise GradflowError(answer)


def _forked(path: Path, check: Callable[[Path], None]) -> str:
    read_end, write_end = os.pipe()
    # Forked while holding h5py's lock: no other thread is inside HDF5 at that moment, so
    # the child's copy of the library is in a consistent state.
    with phil, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, never return into the caller
        try:
            os.close(read_end)
            os.write(write_end, _answer(path, check).encode()[:4096])
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        chunks, deadline = [], time.monotonic() + PROBE_SECONDS
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return _timed_out(path)
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        status = os.waitpid(pid, 0)[1]
        pid = 0
    finally:
        os.close(read_end)
        if pid:  # interrupted (Ctrl-C) or timed out: the child goes too
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return _crashed(path, os.WTERMSIG(status))
    return b"".join(chunks).decode(errors="replace")


def _spawned(path: Path, target: str) -> str:
    module, function = target.split(":")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from gradflow.runfile.opening import _answer\n"
        f"from {module} import {function} as check\n"
        "sys.stdout.write(_answer(Path(sys.argv[1]), check))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", code, os.fspath(path)],
            capture_output=True,
            timeout=PROBE_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return _timed_out(path)
    if done.returncode < 0:
        return _crashed(path, -done.returncode)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        return f"{path}: cannot check the file ({printable(lines[-1]) if lines else 'failed'})"
    return done.stdout.decode(errors="replace")


def _answer(path: Path, check: Callable[[Path], None]) -> str:
    """The one-line error of ``check(path)``, or ``""``."""
    try:
        check(path)
    except GradflowError as err:
        return str(err)
    return ""


def _timed_out(path: Path) -> str:
    return f"{path}: damaged run file (no answer within {PROBE_SECONDS:.0f} s)"


def _crashed(path: Path, signal_number: int) -> str:
    return f"{path}: damaged run file (reading it crashed HDF5: signal {signal_number})"
