"""Writing output files safely in folders others may write to.

Every file gradflow writes is made as a new file under a name nobody can predict, in the
target's folder, written, flushed to disk and only then renamed over the target. Creating
a new file (``O_CREAT | O_EXCL``) never follows a symbolic link planted at the temporary
name, and the rename replaces a link at the target's name instead of writing through it.
A crash or an error leaves the previous file (or none), never half a file.

Standard library only: the report and the live view use this without importing torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFDIR: "a directory",
}


def file_kind(mode: int) -> str:
    """What a non-regular file of ``st_mode`` ``mode`` is, in words (``"a FIFO"``)."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _umask() -> int:
    """This process's umask, read without changing it (another thread may create files)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    # Without /proc: set and restore, the only portable way to read it.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _temporary_name(target: Path) -> str:
    # A hidden name that says what it belongs to; mkstemp/mkdtemp add random characters.
    return f".{target.name}."


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; not every file system allows it on a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finish(fd: int, temporary: Path, target: Path, mode: int | None) -> None:
    os.fchmod(fd, (0o666 & ~_umask()) if mode is None else mode)
    os.fsync(fd)
    os.replace(temporary, target)
    _fsync_folder(target.parent)


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[BinaryIO]:
    """A new binary file to write ``target``'s content to; it replaces ``target`` when the
    block ends without an error, and is deleted otherwise.

    The file is made by :func:`tempfile.mkstemp` in ``target``'s folder (``O_CREAT |
    O_EXCL``, a random name, mode 0600 until it is complete).

    Args:
        target: the file to write (an existing symbolic link there is replaced).
        mode: its permission bits; ``None``: 0666 less the umask, as ``open()`` gives.

    Returns:
        A context manager yielding the open file object.
    """
    path = Path(target)
    folder = path.parent if str(path.parent) else Path(".")
    fd, name = tempfile.mkstemp(dir=folder, prefix=_temporary_name(path), suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            _finish(file.fileno(), temporary, path, mode)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """A path for writers that open files by name (HDF5): an empty new file inside a
    private folder (``mkdtemp``, mode 0700) made in ``target``'s folder; it replaces
    ``target`` when the block ends without an error.

    Nobody but this user (and root) can change what the name inside a 0700 folder points
    at, so the writer may reopen it by name. Before the rename the name is checked to
    still be the regular file made here (``O_NOFOLLOW``, same inode).

    Args:
        target: the file to write (an existing symbolic link there is replaced).
        mode: its permission bits; ``None``: 0666 less the umask.

    Returns:
        A context manager yielding the path to write.

    Raises:
        OSError: the name no longer holds the file made here.
    """
    path = Path(target)
    folder = Path(tempfile.mkdtemp(dir=path.parent if str(path.parent) else ".",
                                   prefix=_temporary_name(path)))  # fmt: skip
    temporary = folder / path.name
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        made = os.fstat(fd)
        os.close(fd)
        yield temporary
        fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
                raise OSError(f"{temporary} was replaced while it was written")
            _finish(fd, temporary, path, mode)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
