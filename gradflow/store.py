"""The run file (HDF5, schema v1) in one place: layout, writer, reader, validation.

Schema v1 (all paths absolute inside the file)::

    attrs            schema_version=1, gradflow_version, created (ISO 8601), config (JSON),
                     torch_version, device, flush_every, flush_seconds
    /layers          compound [L]: name, kind, type, depth, n_params, shape (forward order)
    /steps           int64   [T]  optimizer step index (0-based) of each recorded row
    /epoch           int32   [T]  epoch the step belongs to
    /time            float64 [T]  seconds since the recorder started, at the end of the step
    /loss            float32 [T]  loss logged for the step (NaN when none was logged)
    /scale           float32 [T]  AMP grad-scaler scale used by the step (NaN without a scaler)
    /skipped         uint8   [T]  1 when the grad scaler skipped the optimizer step
    /overhead        float32 [T, 4]  seconds the recorder spent: hooks, stats, copy, writer
    /scalars/names   S64 [32], /scalars/values float64 [T, 32]: other logged scalars
    /stats/<probe>/<statistic>  float32 [T, L]
    /epochs/index    int32 [E], /epochs/end_step int64 [E]
    /epochs/<statistic>         float32 [E, L]  per-epoch update statistics
    /epochs/metrics/names S64 [32], /epochs/metrics/values float64 [E, 32]
    /events          compound [K]: step, epoch, time, kind, probe, layer, detail
    /counts          int64 [3]: committed rows of steps, epochs, events

Crash safety: the file is created complete (all datasets, no rows) under a temporary name
and renamed into place, then written in HDF5 SWMR mode, which keeps the file structure
valid at every moment. Rows count only once ``/counts`` says so; ``/counts`` is written
after the rows and their flush, so a reader never sees a half-written row, also after the
writer was killed. Readers open a file in SWMR mode only while its writer has it open (or
was killed); see :mod:`gradflow.validate` for the checks every file passes before use.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import stat as _stat
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gradflow.errors import GradflowError, unknown_name
from gradflow.validate import (
    Layout,
    check_layout,
    check_rows,
    in_child,
    open_hdf5,
    printable,
    read_counts,
    read_names,
)

if sys.platform == "win32":  # no flock(): a second writer is not detected there
    fcntl = None
else:
    import fcntl

SCHEMA_VERSION = 1
MAX_NAMED = 32  # capacity of /scalars and /epochs/metrics: SWMR cannot add datasets later
OVERHEAD_COLUMNS = ("hooks", "stats", "copy", "writer")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
_UNCLOSABLE: list[h5py.File] = []  # files HDF5 failed to close (see _close)

_LAYER_DTYPE = np.dtype(
    [
        ("name", "S256"),
        ("kind", "S32"),
        ("type", "S64"),
        ("depth", "<i4"),
        ("n_params", "<i8"),
        ("shape", "S256"),
    ]
)
_EVENT_DTYPE = np.dtype(
    [
        ("step", "<i8"),
        ("epoch", "<i4"),
        ("time", "<f8"),
        ("kind", "S32"),
        ("probe", "S32"),
        ("layer", "S256"),
        ("detail", "S512"),
    ]
)


@dataclass(frozen=True)
class Layer:
    """One recorded layer: a module that directly owns trainable parameters."""

    index: int
    name: str
    kind: str
    type: str
    depth: int
    n_params: int
    shape: str


@dataclass(frozen=True)
class Event:
    """Something that happened at a step: ``nonfinite``, ``resume``, ``anomaly``..."""

    step: int
    epoch: int
    time: float
    kind: str
    probe: str = ""
    layer: str = ""
    detail: str = ""


@dataclass
class StepRows:
    """A block of recorded steps on the host, ready to append."""

    steps: np.ndarray
    epoch: np.ndarray
    time: np.ndarray
    loss: np.ndarray
    scale: np.ndarray
    skipped: np.ndarray
    overhead: np.ndarray
    stats: dict[tuple[str, str], np.ndarray]
    scalars: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)


def _chunk_rows(n_cols: int, live: bool = False) -> int:
    # Live files are uncompressed: small chunks keep the preallocated tail small.
    return int(max(16, min(128 if live else 1024, 2**18 // max(n_cols, 1))))


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _names(ds: h5py.Dataset) -> list[str]:
    return [_decode(v) for v in ds[()] if v]


class RunWriter:
    """Synchronous writer of one run file (the recorder drives it from its writer thread).

    It holds the file's :class:`WriteLock` from :meth:`create` or :meth:`resume` to
    :meth:`close`: a second writer, in another process, is refused.
    """

    def __init__(self, path: Path, file: h5py.File, lock: WriteLock) -> None:
        self.path = path
        self._f = file
        self._lock = lock
        counts = file["counts"][()]
        self._n_steps, self._n_epochs, self._n_events = (int(c) for c in counts)
        self._scalar_names = _names(file["scalars/names"])
        self._metric_names = _names(file["epochs/metrics/names"])
        self.n_layers = len(file["layers"])

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        layers: Sequence[Layer],
        step_stats: Mapping[str, Sequence[str]],
        epoch_stats: Sequence[str],
        config: Mapping[str, Any],
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> RunWriter:
        """Create the complete (empty) run file atomically and open it for SWMR writing."""
        target = Path(path)
        lock = WriteLock.acquire(target)  # before anything is checked or replaced
        try:
            check_writable(target, overwrite=overwrite)
            cls._write_new(target, layers, step_stats, epoch_stats, config, attrs or {})
            return cls._open_swmr(target, lock)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _write_new(
        target: Path,
        layers: Sequence[Layer],
        step_stats: Mapping[str, Sequence[str]],
        epoch_stats: Sequence[str],
        config: Mapping[str, Any],
        attrs: Mapping[str, Any],
    ) -> None:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            # Built in memory, then written by plain file I/O: a full disk fails here cleanly,
            # not inside HDF5, which cannot close a file it failed to write.
            image = io.BytesIO()
            with h5py.File(image, "w", libver="latest") as f:
                _write_layout(f, layers, step_stats, epoch_stats, config, attrs)
            tmp.write_bytes(image.getvalue())
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise GradflowError(
                f"{target}: cannot write the run file ({err.strerror or err})"
            ) from err

    @classmethod
    def resume(
        cls, path: str | os.PathLike[str], *, keep_steps_below: int, keep_epochs: int
    ) -> RunWriter:
        """Reopen a run for appending, dropping rows at or after ``keep_steps_below``.

        A killed SWMR writer leaves its file marked as open; HDF5 then refuses to reopen it
        for writing. The committed rows are copied into a fresh file that replaces it.
        """
        target = Path(path)
        lock = WriteLock.acquire(target)
        try:
            check_writable(target, overwrite=True)
            cls._rewrite_truncated(target, keep_steps_below, keep_epochs)
            return cls._open_swmr(target, lock)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _rewrite_truncated(target: Path, keep_steps_below: int, keep_epochs: int) -> None:
        run = open_run(target)
        n_steps = int(np.searchsorted(run.steps, keep_steps_below))
        n_epochs = min(keep_epochs, run.n_epochs)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            dst = h5py.File(tmp, "w", libver="latest", rdcc_nbytes=0)  # see _open_swmr
            try:
                _copy_truncated(run, dst, n_steps, n_epochs)
            finally:
                _close(dst)
            run.close()
            os.replace(tmp, target)
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError when close fails
            tmp.unlink(missing_ok=True)
            raise GradflowError(f"{target}: cannot rewrite the run file ({err})") from err
        finally:
            run.close()

    @classmethod
    def _open_swmr(cls, target: Path, lock: WriteLock) -> RunWriter:
        # No raw-data chunk cache: a failed write (disk full) then raises at the write, not
        # later inside a dataset handle's close, which HDF5 cannot finish and retries at
        # exit, crashing the process. Free: each write's dataset handle is closed right
        # after the write, which flushed the cache anyway.
        # Opened in SWMR-write mode at once (not r+ then swmr_mode = True): a kill between
        # the two would leave a file flagged "open for write" that no reader accepts.
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
        mdc, slots, _, w0 = fapl.get_cache()
        fapl.set_cache(mdc, slots, 0, w0)
        # No HDF5 file lock (WriteLock keeps other writers out), as readers open it: HDF5
        # refuses a second open within one process whose locking flags differ.
        fapl.set_file_locking(False, True)
        flags = h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE
        f = h5py.File(h5py.h5f.open(os.fsencode(target), flags, fapl=fapl))
        return cls(target, f, lock)

    # -- appending --------------------------------------------------------------------------
    def stat_names(self, probe: str) -> list[str]:
        """The per-step statistics of ``probe`` that the file holds, in its order."""
        group = self._f.get(f"stats/{probe}")
        return list(group) if group is not None else []

    @property
    def n_steps(self) -> int:
        return self._n_steps

    def append_steps(self, rows: StepRows) -> None:
        """Append a block of step rows (made visible by the next :meth:`commit`)."""
        n = len(rows)
        if n == 0:
            return
        a, b = self._n_steps, self._n_steps + n
        f = self._f
        for key, values in (
            ("steps", rows.steps),
            ("epoch", rows.epoch),
            ("time", rows.time),
            ("loss", rows.loss),
            ("scale", rows.scale),
            ("skipped", rows.skipped),
            ("overhead", rows.overhead),
        ):
            _put(f[key], a, b, values)
        for (probe, stat), values in rows.stats.items():
            _put(f[f"stats/{probe}/{stat}"], a, b, values)
        scalars = np.full((n, MAX_NAMED), np.nan)
        for name, values in rows.scalars.items():
            scalars[:, self._column(self._scalar_names, "scalars/names", name)] = values
        _put(f["scalars/values"], a, b, scalars)
        self._n_steps = b

    def append_epoch(
        self,
        epoch: int,
        end_step: int,
        stats: Mapping[str, np.ndarray],
        metrics: Mapping[str, float],
    ) -> None:
        """Append one epoch row: per-layer update statistics and scalar metrics."""
        f = self._f
        a, b = self._n_epochs, self._n_epochs + 1
        _put(f["epochs/index"], a, b, np.array([epoch], np.int32))
        _put(f["epochs/end_step"], a, b, np.array([end_step], np.int64))
        for name, values in stats.items():
            _put(f[f"epochs/{name}"], a, b, np.asarray(values, np.float32)[None, :])
        row = np.full((1, MAX_NAMED), np.nan)
        for name, value in metrics.items():
            row[0, self._column(self._metric_names, "epochs/metrics/names", name)] = value
        _put(f["epochs/metrics/values"], a, b, row)
        self._n_epochs = b

    def add_event(self, event: Event) -> None:
        """Append one event."""
        rec = np.array(
            [
                (
                    event.step,
                    event.epoch,
                    event.time,
                    event.kind.encode()[:32],
                    event.probe.encode()[:32],
                    event.layer.encode()[:256],
                    event.detail.encode()[:512],
                )
            ],
            dtype=_EVENT_DTYPE,
        )
        _put(self._f["events"], self._n_events, self._n_events + 1, rec)
        self._n_events += 1

    def commit(self) -> None:
        """Flush the rows, then publish their count, then flush again (see module doc)."""
        self._f.flush()
        self._f["counts"][:] = np.array([self._n_steps, self._n_epochs, self._n_events], np.int64)
        self._f.flush()

    def close(self, *, compact_file: bool = True) -> None:
        """Commit and close the file (idempotent), also after a failed commit; then
        :func:`compact` it and release the write lock."""
        if not self._f.id.valid:
            return
        try:
            try:
                self.commit()
            finally:
                _close(self._f)
            if compact_file:
                compact(self.path)
        finally:
            self._lock.release()

    def _column(self, names: list[str], dataset: str, name: str) -> int:
        if name in names:
            return names.index(name)
        if len(names) >= MAX_NAMED:
            raise GradflowError(
                f"{self.path}: more than {MAX_NAMED} distinct names in /{dataset}; "
                f"cannot add {name!r}"
            )
        names.append(name)
        self._f[dataset][len(names) - 1] = name.encode()[:64]
        return len(names) - 1


def compact(path: Path) -> None:
    """Rewrite a finished run file gzip-compressed, atomically.

    While a run is written its datasets are uncompressed: HDF5 rewrites a partial
    compressed chunk at a new place on every flush and, in SWMR mode, never reuses the
    old space, so the file would grow many times over. At a clean close the file is
    copied once, compressed; if that fails (a full disk, say) the uncompressed file stays.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open_run(path) as run:
            dst = h5py.File(tmp, "w", libver="latest")
            try:
                _copy_truncated(run, dst, run.n_steps, run.n_epochs, compress=True)
            finally:
                _close(dst)
        os.replace(tmp, path)
    except (OSError, RuntimeError, GradflowError):
        tmp.unlink(missing_ok=True)


def _close(f: h5py.File) -> None:
    """Close ``f``. After a failed write (disk full) HDF5 cannot flush it and keeps it open;
    freeing the handle would then print h5py finaliser tracebacks, so it is kept to the end."""
    try:
        f.close()
    except Exception:
        _UNCLOSABLE.append(f)
        raise


def _put(ds: h5py.Dataset, a: int, b: int, values: np.ndarray) -> None:
    if ds.shape[0] < b:
        ds.resize(b, axis=0)
    ds[a:b] = values


def _write_layout(
    f: h5py.File,
    layers: Sequence[Layer],
    step_stats: Mapping[str, Sequence[str]],
    epoch_stats: Sequence[str],
    config: Mapping[str, Any],
    attrs: Mapping[str, Any],
) -> None:
    import torch

    from gradflow import __version__

    n_layers = len(layers)
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["gradflow_version"] = __version__
    f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    f.attrs["config"] = json.dumps(config, default=str)
    f.attrs["torch_version"] = str(torch.__version__)
    for key, value in attrs.items():
        f.attrs[key] = value
    table = np.array(
        [
            (
                lay.name.encode()[:256],
                lay.kind.encode()[:32],
                lay.type.encode()[:64],
                lay.depth,
                lay.n_params,
                lay.shape.encode()[:256],
            )
            for lay in layers
        ],
        dtype=_LAYER_DTYPE,
    )
    f.create_dataset("layers", data=table)

    def series(name: str, dtype: Any, cols: int | None = None) -> h5py.Dataset:
        shape = (0,) if cols is None else (0, cols)
        rows = _chunk_rows(cols or 1, live=True)
        chunks = (rows,) if cols is None else (rows, cols)
        return f.create_dataset(
            name,
            shape=shape,
            maxshape=(None, *shape[1:]),
            dtype=dtype,
            chunks=chunks,
            fillvalue=np.nan if np.dtype(dtype).kind == "f" else 0,
        )

    series("steps", np.int64)
    series("epoch", np.int32)
    series("time", np.float64)
    series("loss", np.float32)
    series("scale", np.float32)
    series("skipped", np.uint8)
    series("overhead", np.float32, len(OVERHEAD_COLUMNS)).attrs["columns"] = list(OVERHEAD_COLUMNS)
    f.create_dataset("scalars/names", data=np.zeros(MAX_NAMED, "S64"))
    series("scalars/values", np.float64, MAX_NAMED)
    for probe, names in step_stats.items():
        for stat in names:
            series(f"stats/{probe}/{stat}", np.float32, n_layers)
    series("epochs/index", np.int32)
    series("epochs/end_step", np.int64)
    for stat in epoch_stats:
        series(f"epochs/{stat}", np.float32, n_layers)
    f.create_dataset("epochs/metrics/names", data=np.zeros(MAX_NAMED, "S64"))
    series("epochs/metrics/values", np.float64, MAX_NAMED)
    f.create_dataset("events", shape=(0,), maxshape=(None,), dtype=_EVENT_DTYPE, chunks=(64,))
    f.create_dataset("counts", data=np.zeros(3, np.int64))


def _copy_truncated(
    run: Run, dst: h5py.File, n_steps: int, n_epochs: int, *, compress: bool = False
) -> None:
    src = run._f
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    block = 65536

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        if name in ("layers", "counts", "scalars/names", "epochs/metrics/names"):
            dst.create_dataset(name, data=obj[()])
            return
        if name == "events":
            keep = [e for e in obj[: run.n_events] if e["step"] < run_steps_limit]
            ds = dst.create_dataset(
                name, shape=(len(keep),), maxshape=(None,), dtype=obj.dtype, chunks=(64,)
            )
            if keep:
                ds[:] = np.array(keep, dtype=obj.dtype)
            return
        n = n_epochs if name.startswith("epochs/") else n_steps
        ds = dst.create_dataset(
            name,
            shape=(n, *obj.shape[1:]),
            maxshape=obj.maxshape,
            dtype=obj.dtype,
            chunks=(
                _chunk_rows(obj.shape[1] if obj.ndim > 1 else 1, live=not compress),
                *obj.shape[1:],
            ),
            fillvalue=obj.fillvalue,
            **(_COMPRESSION if compress else {}),
        )
        for k, v in obj.attrs.items():
            ds.attrs[k] = v
        for start in range(0, n, block):
            stop = min(n, start + block)
            ds[start:stop] = obj[start:stop]

    run_steps_limit = int(run.steps[n_steps]) if n_steps < run.n_steps else np.iinfo(np.int64).max
    src.visititems(visit)
    n_events = len(dst["events"])
    dst["counts"][:] = np.array([n_steps, n_epochs, n_events], np.int64)


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
            raise GradflowError(
                f"{path}: cannot open the lock file {key} ({err.strerror or err})"
            ) from None
        try:
            opened = os.fstat(fd)
            if not _stat.S_ISREG(opened.st_mode):
                raise GradflowError(f"{path}: the lock file {key} is not a regular file")
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


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------
class Run:
    """A run file opened for reading; safe on files that are still being written.

    Arrays are read on access. ``refresh()`` picks up rows a live writer added since.
    Text read from the file (layer, statistic and metric names, attributes, events) comes
    without control characters; ``config`` is the stored JSON object.
    """

    def __init__(self, path: Path, file: h5py.File, layout: Layout) -> None:
        self.path = path
        self._f = file
        self._layout = layout
        self._datasets = layout.datasets
        self.attrs: dict[str, Any] = layout.attrs
        self.config: dict[str, Any] = layout.config
        self.layers: list[Layer] = [Layer(index=i, **row) for i, row in enumerate(layout.layers)]
        self.n_steps, self.n_epochs, self.n_events = layout.counts

    def refresh(self) -> None:
        """Re-read the committed row counts (for a run that is still being written).

        ``/counts`` is read first, then every dataset's extent: the writer grows a dataset
        and flushes its rows before it publishes them in ``/counts``, so each extent then
        holds the counted rows and every series has the same length.
        """
        if not self._f.swmr_mode:
            return
        counts_ds = self._datasets["counts"]
        try:
            counts_ds.refresh()
            counts = read_counts(self.path, counts_ds)
            for ds in self._datasets.values():
                # Only growing datasets have extents to re-read; refreshing a fixed-size one
                # (the name lists, written in place) fails in HDF5 once the writer wrote it.
                if ds.maxshape != ds.shape or ds.chunks is not None:
                    ds.refresh()
            check_rows(self.path, self.path.stat().st_size, self._datasets, counts)
            # A name is written before the first row that uses it is counted.
            layout = self._layout
            layout.scalar_names = read_names(self.path, "scalars/names", self._datasets)
            layout.metric_names = read_names(self.path, "epochs/metrics/names", self._datasets)
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise GradflowError(f"{self.path}: damaged run file ({_first_line(err)})") from err
        self.n_steps, self.n_epochs, self.n_events = counts

    def _read(self, key: str, rows: slice | None = None) -> np.ndarray:
        """Rows of a checked dataset; HDF5's errors on damaged data as one line."""
        try:
            ds = self._datasets[key]
            return np.asarray(ds[()] if rows is None else ds[rows])
        except (OSError, RuntimeError, ValueError) as err:
            raise GradflowError(
                f"{self.path}: damaged run file (/{key}: {_first_line(err)})"
            ) from err

    # -- description ------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    @property
    def name(self) -> str:
        """A short label for figures: the model name from the config, else the file stem."""
        model = self.config.get("model")
        if isinstance(model, dict):
            model = model.get("name")
        return printable(str(model)) if model else self.path.stem

    def probes(self) -> dict[str, list[str]]:
        """Per-step statistics stored, by probe (``{"param": ["grad_norm", ...], ...}``)."""
        return {probe: list(names) for probe, names in self._layout.probes.items()}

    def epoch_stats(self) -> list[str]:
        """Per-epoch per-layer statistics stored (e.g. ``update_abs_mean``)."""
        return list(self._layout.epoch_stats)

    # -- per-step data ----------------------------------------------------------------------
    def _series(self, key: str) -> np.ndarray:
        return self._read(key, slice(0, self.n_steps))

    @property
    def steps(self) -> np.ndarray:
        """int64 [T]: the optimizer step of each recorded row."""
        return self._series("steps")

    @property
    def epoch(self) -> np.ndarray:
        """int32 [T]: the epoch of each recorded row."""
        return self._series("epoch")

    @property
    def time(self) -> np.ndarray:
        """float64 [T]: seconds since the recorder started."""
        return self._series("time")

    @property
    def loss(self) -> np.ndarray:
        """float32 [T]: logged loss (NaN where none was logged)."""
        return self._series("loss")

    @property
    def scale(self) -> np.ndarray:
        """float32 [T]: AMP grad-scaler scale (NaN without a scaler)."""
        return self._series("scale")

    @property
    def skipped(self) -> np.ndarray:
        """bool [T]: steps the grad scaler skipped."""
        return self._series("skipped").astype(bool)

    @property
    def overhead(self) -> dict[str, float]:
        """Seconds the recorder spent in total, by part, plus the run's wall time."""
        rows = self._series("overhead")
        out = {col: float(rows[:, i].sum()) for i, col in enumerate(OVERHEAD_COLUMNS)}
        t = self.time
        out["wall"] = float(t[-1]) if len(t) else 0.0
        return out

    @property
    def scalars(self) -> dict[str, np.ndarray]:
        """Other logged per-step scalars by name, float64 [T]."""
        values = self._series("scalars/values")
        return {name: values[:, i] for i, name in enumerate(self._layout.scalar_names)}

    def _key(self, probe: str, name: str) -> str:
        key = f"epochs/{name}" if probe == "epoch" else f"stats/{probe}/{name}"
        stored = self._layout.epoch_stats if probe == "epoch" else self._layout.probes.get(probe)
        if name not in (stored or ()):
            names = [f"epoch/{s}" for s in self.epoch_stats()] + [
                f"{p}/{s}" for p, stats in self.probes().items() for s in stats
            ]
            raise unknown_name(f"statistic in {self.path}", f"{probe}/{name}", names)
        return key

    def stat(
        self,
        probe: str,
        name: str,
        rows: slice | None = None,
        layers: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """float32 [T, L] for a step statistic, or [E, L] for ``probe="epoch"``.

        ``rows`` selects recorded rows (a slice), ``layers`` layer indices.
        """
        key = self._key(probe, name)
        n = self.n_epochs if probe == "epoch" else self.n_steps
        start, stop, step = (rows or slice(None)).indices(n)
        ds = self._datasets[key]
        data = (
            self._read(key, slice(start, stop))[::step]
            if stop > start
            else np.zeros((0, ds.shape[1]), ds.dtype)
        )
        return data if layers is None else data[:, np.asarray(layers, dtype=np.int64)]

    def stat_blocks(
        self, probe: str, name: str, block_rows: int = 8192
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, block)`` pieces of a statistic, for runs too large for memory."""
        key = self._key(probe, name)
        ds = self._datasets[key]
        n = self.n_epochs if probe == "epoch" else self.n_steps
        chunk = ds.chunks[0] if ds.chunks else block_rows
        block_rows = max(chunk, block_rows // chunk * chunk)
        for start in range(0, n, block_rows):
            yield start, self._read(key, slice(start, min(n, start + block_rows)))

    # -- per-epoch data ---------------------------------------------------------------------
    @property
    def epochs(self) -> np.ndarray:
        """int32 [E]: the epoch numbers that were closed."""
        return self._read("epochs/index", slice(0, self.n_epochs))

    @property
    def epoch_end_step(self) -> np.ndarray:
        """int64 [E]: the number of optimizer steps done when each epoch closed."""
        return self._read("epochs/end_step", slice(0, self.n_epochs))

    @property
    def metrics(self) -> dict[str, np.ndarray]:
        """Per-epoch scalar metrics (``train_loss``, ``val_loss``, ``v_rand``, ...), [E]."""
        values = self._read("epochs/metrics/values", slice(0, self.n_epochs))
        return {name: values[:, i] for i, name in enumerate(self._layout.metric_names)}

    # -- events -------------------------------------------------------------------------------
    @property
    def events(self) -> list[Event]:
        """Events in the order they were written."""
        return [
            Event(
                step=int(r["step"]),
                epoch=int(r["epoch"]),
                time=float(r["time"]),
                kind=_text(r["kind"]),
                probe=_text(r["probe"]),
                layer=_text(r["layer"]),
                detail=_text(r["detail"]),
            )
            for r in self._read("events", slice(0, self.n_events))
        ]

    @property
    def first_nonfinite(self) -> Event | None:
        """The first non-finite event (step, layer, probe), if any."""
        return next((e for e in self.events if e.kind == "nonfinite"), None)

    # -- export -------------------------------------------------------------------------------
    def to_dataframe(self) -> Any:
        """All per-step statistics in long format: step, layer, probe, stat, value."""
        import pandas as pd

        steps = self.steps
        names = np.array(self.layer_names, dtype=object)
        frames = []
        for probe, stats in self.probes().items():
            for stat in stats:
                data = self.stat(probe, stat)
                frames.append(
                    pd.DataFrame(
                        {
                            "step": np.repeat(steps, self.n_layers),
                            "layer": np.tile(names, len(steps)),
                            "probe": probe,
                            "stat": stat,
                            "value": data.reshape(-1),
                        }
                    )
                )
        if not frames:
            return pd.DataFrame(columns=["step", "layer", "probe", "stat", "value"])
        return pd.concat(frames, ignore_index=True)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f.id.valid:
            self._f.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Run({str(self.path)!r}, layers={self.n_layers}, steps={self.n_steps}, "
            f"epochs={self.n_epochs})"
        )


def _text(value: bytes) -> str:
    """Text of a fixed-length string field, undecodable bytes and control characters
    replaced (events are free text: shown, never matched against names)."""
    return printable(bytes(value).decode("utf-8", errors="replace"))


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a run file for reading; any problem raises one clear :class:`GradflowError`.

    The file is checked against the schema before any data is used, first in a child
    process with a time limit (see :mod:`gradflow.validate`): opening any file, damaged or
    crafted, gives an answer within seconds.
    """
    p = Path(path)
    if not p.exists():
        raise GradflowError(f"{p}: no such run file")
    if p.is_dir():
        raise GradflowError(f"{p}: is a directory, not a run file")
    if not p.is_file():
        raise GradflowError(f"{p}: not a regular file, so not a gradflow run")
    if p.stat().st_size == 0:
        raise GradflowError(f"{p}: empty file, not a gradflow run")
    with open(p, "rb") as fh:
        if fh.read(8) != _HDF5_SIGNATURE:
            raise GradflowError(f"{p}: not an HDF5 file, so not a gradflow run")
    in_child(p, _check_run, "gradflow.store:_check_run")
    return _load(p)


def _check_run(path: Path) -> None:
    _load(path).close()


def _load(p: Path) -> Run:
    try:
        f = open_hdf5(p)
    except OSError as err:
        raise GradflowError(f"{p}: damaged or truncated HDF5 file ({_first_line(err)})") from err
    try:
        return Run(p, f, check_layout(p, f, SCHEMA_VERSION))
    except GradflowError:
        f.close()
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
        f.close()
        raise GradflowError(f"{p}: damaged run file ({_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return printable(text.splitlines()[0]) if text else type(err).__name__
