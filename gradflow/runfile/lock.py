"""The write lock of a run file (one writer at a time) and the checks of a path to write."""

from __future__ import annotations

import contextlib
import errno
import os
import stat as _stat
import sys
import threading
from pathlib import Path

from gradflow.errors import GradflowError

if sys.platform == "win32":  # no flock(): a second writer is not detected there
    fcntl = None
else:
    import fcntl


def check_writable(path: Path, *, overwrite: bool) -> None:
    """Fail fast, in one line, when ``path`` cannot or must not be written: only a regular
    file is ever replaced (never a device, a FIFO or a directory), and only with ``overwrite``."""
    _check_place(path)
    if path.exists() and not overwrite:
        raise GradflowError(f"{path}: file exists; pass --force (overwrite=True) to replace it")
    if not os.access(path.parent if str(path.parent) else ".", os.W_OK):
        raise GradflowError(f"{path}: directory {path.parent} is not writable")


def _check_place(path: Path) -> None:
    """``path`` is a regular file or nothing, in an existing directory."""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise GradflowError(f"{path}: {parent} is not a directory")
    if not parent.is_dir():
        raise GradflowError(f"{path}: directory {parent} does not exist")
    try:
        mode: int | None = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise GradflowError(f"{path}: cannot inspect it ({err.strerror or err})") from None
    if mode is not None and _stat.S_ISDIR(mode):
        raise GradflowError(f"{path}: is a directory, not a run file path")
    if mode is not None and not _stat.S_ISREG(mode):
        raise GradflowError(f"{path}: {_file_kind(mode)}, not a regular file; not replacing it")


def _file_kind(mode: int) -> str:
    kinds = {
        _stat.S_ISCHR: "a character device",
        _stat.S_ISBLK: "a block device",
        _stat.S_ISFIFO: "a FIFO",
        _stat.S_ISSOCK: "a socket",
    }
    return next((text for test, text in kinds.items() if test(mode)), "a special file")


def lock_path(path: Path) -> Path:
    """The lock file of a run file: ``RUN.h5`` -> ``RUN.h5.lock``."""
    return path.with_name(f"{path.name}.lock")


_HELD: dict[str, list[int]] = {}  # lock file -> [descriptor, holders] for this process
_HELD_GUARD = threading.Lock()


class WriteLock:
    """This process's exclusive right to write one run file; :meth:`acquire` it.

    An OS lock (``flock``) on ``RUN.h5.lock`` beside the run file, which holds the
    writer's process id. The kernel drops the lock when its process ends, also by
    ``kill -9``. The lock sits on a file of its own because the run file itself is replaced
    by renames (creation, ``--force``, resume, compaction). Within a process the lock is
    re-entrant (the training loop holds it while its recorder's writer takes it again).
    Readers never look at it. On Windows nothing is locked.
    """

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self._key = key
        self._held = True

    @classmethod
    def acquire(cls, path: str | os.PathLike[str]) -> WriteLock:
        """Claim ``path`` for writing, or raise ``RUN.h5 is being written by process PID``."""
        path = Path(path)
        _check_place(path)  # before the lock file is made beside it
        parent = os.path.realpath(path.parent if str(path.parent) else ".")
        key = os.path.join(parent, lock_path(path).name)
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
            elif fcntl is not None:
                _HELD[key] = [_lock(path, key), 1]
        return cls(path, key)

    def release(self) -> None:
        """Give the lock up (idempotent); the last holder in this process removes the file."""
        with _HELD_GUARD:
            if not self._held:
                return
            self._held = False
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[self._key]
                # Removed while still locked: a process that opened the old file meanwhile
                # sees, once it gets the lock, that the name no longer leads to it (_lock).
                with contextlib.suppress(OSError):
                    os.unlink(self._key)
                os.close(entry[0])

    def __enter__(self) -> WriteLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock(path: Path, key: str) -> int:
    """Open and lock the lock file ``key`` of ``path``; its descriptor."""
    assert fcntl is not None
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        try:
            fd = os.open(key, flags, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise GradflowError(
                    f"{path}: refused: the lock file {key} is a symbolic link"
                ) from None
            raise GradflowError(
                f"{path}: cannot open the lock file {key} ({err.strerror or err})"
            ) from None
        try:
            opened = os.fstat(fd)
            if opened.st_nlink == 0:  # removed by its holder since we opened it: retry
                os.close(fd)
                continue
            _check_lock_file(path, key, opened)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                who = f"process {pid}" if pid.isdigit() else "another process"
                raise GradflowError(f"{path} is being written by {who}") from None
            try:
                now = os.stat(key, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed this file as we locked it: lock the new one
    raise GradflowError(f"{path}: cannot lock {key} (it keeps being replaced)")


def _check_lock_file(path: Path, key: str, opened: os.stat_result) -> None:
    """The lock file is written (truncated to this process's id) only when it is a regular
    file of this user with no other name: a hard link planted at ``RUN.h5.lock`` would
    otherwise have the writer truncate the file it leads to."""
    if not _stat.S_ISREG(opened.st_mode):
        raise GradflowError(f"{path}: refused: the lock file {key} is not a regular file")
    if opened.st_nlink != 1:
        raise GradflowError(
            f"{path}: refused: the lock file {key} has {opened.st_nlink} names (a hard link)"
        )
    if opened.st_uid != os.geteuid():
        raise GradflowError(
            f"{path}: refused: the lock file {key} belongs to user {opened.st_uid}, not to you"
        )
