"""The folder of gradflow's per-user cache (built C kernels and C++ hooks, synthetic EM
volumes), and the checks that make loading code from it safe: a library is loaded only
from a folder no other user can write to (:func:`unsafe_folder`), only if it is a regular
file of this user that only they can write, checked on the open file
(:func:`open_library`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$GRADFLOW_CACHE_DIR``, else ``$XDG_CACHE_HOME/gradflow``, else ``~/.cache/gradflow``
    (it may not exist yet)."""
    chosen = os.environ.get("GRADFLOW_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradflow"


def unsafe_folder(folder: Path) -> str:
    """Why another user could have put files into ``folder`` ("" when nobody could).

    The folder and every folder above it (links resolved) must belong to this user or
    root and be writable by nobody else; a sticky folder such as ``/tmp`` may be above
    it (there others cannot rename or delete what is not theirs).
    """
    if not hasattr(os, "geteuid"):  # no POSIX owners to compare
        return ""
    try:
        real = folder.resolve(strict=True)
        chain = [(place, place.stat()) for place in (real, *real.parents)]
    except OSError as err:
        return f"cannot inspect {folder}: {err.strerror or err}"
    for place, info in chain:
        if info.st_uid not in (os.geteuid(), 0):
            return f"{place} belongs to another user (uid {info.st_uid})"
        shared = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if shared and not (place != real and info.st_mode & stat.S_ISVTX):
            return f"{place} can be written by other users"
    return ""


def _trusted(info: os.stat_result) -> bool:
    """A regular file of this user (or root) that nobody else can write."""
    owner = os.geteuid() if hasattr(os, "geteuid") else info.st_uid
    return (
        stat.S_ISREG(info.st_mode)
        and info.st_uid in (owner, 0)
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def open_library(path: Path) -> ctypes.CDLL | None:
    """The library at ``path``, loaded if it is a regular file of this user (or root)
    that nobody else can write (else None), with no race between check and load: the
    file is opened without following a link (nor waiting on a FIFO), checked on the open
    descriptor, and its bytes copied from that descriptor into a private new folder,
    which is what is loaded (a fresh name each time, so the loader never mistakes it for
    a library loaded before)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as source, tempfile.TemporaryDirectory(prefix="gradflow-") as tmp:
        if not _trusted(os.fstat(source.fileno())):
            return None
        copy = Path(tmp) / path.name
        try:  # a full disk or a file-size limit while copying: no library, as unreadable
            with open(copy, "xb") as target:
                shutil.copyfileobj(source, target)
            return ctypes.CDLL(str(copy))
        except OSError:
            return None
