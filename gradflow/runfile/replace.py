"""Making a run file under a name nobody can predict, then renaming it into place.

A run file's folder may be writable by others, and the writer's process id is in the
world-readable lock file: a fixed temporary name such as ``.RUN.h5.tmp-PID`` lets anyone
plant a symbolic link there and have the writer overwrite the file it points at. Every run
file (creation, ``--force``, the rewrite on ``--resume``, the compaction at close) is
therefore written through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, empty file to write ``target``'s content to by name (HDF5 opens files by
    name); it replaces ``target`` when the block ends without an error and is deleted
    otherwise.

    The file lies in a private folder (:func:`tempfile.mkdtemp`, mode 0700, a random name)
    made in ``target``'s folder, and is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``:
    nobody else can put a link at its name. Before the rename the name is checked to still
    hold the file made here. The rename replaces a symbolic link at ``target``; it never
    writes through it.

    Args:
        target: the file to write.

    Returns:
        A context manager yielding the path to write.

    Raises:
        OSError: the folder is not writable, or the file was replaced while written.
    """
    path = Path(target)
    parent = path.parent if str(path.parent) else Path(".")
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}."))
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
            os.fchmod(fd, 0o666 & ~_umask())  # as open() would have made it
            os.replace(temporary, path)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    """This process's umask, read without changing it where /proc allows."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
