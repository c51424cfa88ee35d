"""Writing a run file: creation, appending rows, resuming (a truncated copy), compaction.

See :mod:`gradflow.runfile.schema` for the layout and its crash safety.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gradflow.errors import GradflowError
from gradflow.runfile.lock import WriteLock, check_writable
from gradflow.runfile.read import Run, open_run
from gradflow.runfile.schema import (
    COMPRESSION,
    EVENT_DTYPE,
    LAYER_DTYPE,
    MAX_NAMED,
    OVERHEAD_COLUMNS,
    SCHEMA_VERSION,
    Event,
    Layer,
    StepRows,
    chunk_rows,
)
from gradflow.runfile.validate import printable
from gradflow.safefile import atomic_path

_UNCLOSABLE: list[h5py.File] = []  # files HDF5 failed to close (see _close)


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
        try:
            # Built in memory, then written by plain file I/O: a full disk fails here cleanly,
            # not inside HDF5, which cannot close a file it failed to write.
            image = io.BytesIO()
            with h5py.File(image, "w", libver="latest") as f:
                _write_layout(f, layers, step_stats, epoch_stats, config, attrs)
            with atomic_path(target) as tmp:
                tmp.write_bytes(image.getvalue())
        except OSError as err:
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
        try:
            check_copyable(run, n_steps, n_epochs)  # before anything is written
            with atomic_path(target) as tmp:
                dst = h5py.File(tmp, "w", libver="latest", rdcc_nbytes=0)  # see _open_swmr
                try:
                    _copy_truncated(run, dst, n_steps, n_epochs)
                finally:
                    _close(dst)
                run.close()
        except (OSError, RuntimeError) as err:  # h5py raises RuntimeError when close fails
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
            dtype=EVENT_DTYPE,
        )
        _put(self._f["events"], self._n_events, self._n_events + 1, rec)
        self._n_events += 1

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Set attributes of the file (committed with the next :meth:`commit`)."""
        for key, value in attrs.items():
            self._f.attrs[key] = value

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
    with (
        contextlib.suppress(OSError, RuntimeError, GradflowError),
        open_run(path) as run,
        atomic_path(path) as tmp,
    ):
        dst = h5py.File(tmp, "w", libver="latest")
        try:
            _copy_truncated(run, dst, run.n_steps, run.n_epochs, compress=True)
        finally:
            _close(dst)


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
                ",".join(lay.aliases).encode()[:256],
            )
            for lay in layers
        ],
        dtype=LAYER_DTYPE,
    )
    f.create_dataset("layers", data=table)

    def series(name: str, dtype: Any, cols: int | None = None) -> h5py.Dataset:
        shape = (0,) if cols is None else (0, cols)
        rows = chunk_rows(cols or 1, live=True)
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
    f.create_dataset("events", shape=(0,), maxshape=(None,), dtype=EVENT_DTYPE, chunks=(64,))
    f.create_dataset("counts", data=np.zeros(3, np.int64))


def check_copyable(run: Run, n_steps: int, n_epochs: int) -> None:
    """Refuse, before anything is written, a run file that holds more than the schema's
    objects (the rewrite on ``--resume`` copies only those, each checked as a read checks
    it), or whose copy would not fit on the disk.

    Args:
        run: the open run file.
        n_steps: step rows to keep.
        n_epochs: epoch rows to keep.

    Raises:
        GradflowError: what is refused, in one line.
    """
    layout = run._layout
    groups = {"", "scalars", "epochs", "epochs/metrics"}
    if "stats" in run._f:
        groups |= {"stats", *(f"stats/{probe}" for probe in layout.probes)}
    known = groups | set(layout.datasets)
    for group in sorted(groups):
        for raw in run._f[group or "/"].id:  # link names only: nothing unknown is opened
            name = f"{group}/{raw.decode(errors='replace')}".lstrip("/")
            if name not in known:
                raise GradflowError(
                    f"{run.path}: refused: /{printable(name)} is not part of a run file; "
                    "--resume copies only the run file's own datasets"
                )
    need = sum(_copy_bytes(run, name, n_steps, n_epochs)[1] for name in layout.datasets)
    parent = run.path.parent if str(run.path.parent) else Path(".")
    free = shutil.disk_usage(parent).free
    if need > free:
        raise GradflowError(
            f"{run.path}: cannot rewrite the run file ({need} bytes needed, {free} free)"
        )


def _copy_bytes(run: Run, name: str, n_steps: int, n_epochs: int) -> tuple[int, int]:
    """The rows of ``/name`` to copy and their bytes."""
    ds = run._layout.datasets[name]
    if name in _WHOLE:
        rows = ds.shape[0] if ds.ndim else 1
    elif name == "events":
        rows = run.n_events
    else:
        rows = n_epochs if name.startswith("epochs/") else n_steps
    row_bytes = int(np.prod(ds.shape[1:], dtype=object)) * ds.dtype.itemsize
    return rows, rows * row_bytes


_WHOLE = ("layers", "counts", "scalars/names", "epochs/metrics/names")
_BLOCK_BYTES = 16 * 2**20  # what one copy step holds in memory


def _copy_truncated(
    run: Run, dst: h5py.File, n_steps: int, n_epochs: int, *, compress: bool = False
) -> None:
    """Copy the schema's datasets of ``run`` (nothing else) into ``dst``, keeping
    ``n_steps`` step rows and ``n_epochs`` epoch rows, in blocks of bounded size."""
    for key, value in run._f.attrs.items():
        dst.attrs[key] = value
    limit = int(run.steps[n_steps]) if n_steps < run.n_steps else np.iinfo(np.int64).max
    for name, obj in sorted(run._layout.datasets.items()):
        if name in _WHOLE:
            dst.create_dataset(name, data=run._read(name))
            continue
        if name == "events":
            keep = [e for e in run._read(name, slice(0, run.n_events)) if e["step"] < limit]
            ds = dst.create_dataset(
                name, shape=(len(keep),), maxshape=(None,), dtype=obj.dtype, chunks=(64,)
            )
            if keep:
                ds[:] = np.array(keep, dtype=obj.dtype)
            continue
        n, nbytes = _copy_bytes(run, name, n_steps, n_epochs)
        ds = dst.create_dataset(
            name,
            shape=(n, *obj.shape[1:]),
            maxshape=obj.maxshape,
            dtype=obj.dtype,
            chunks=(
                chunk_rows(obj.shape[1] if obj.ndim > 1 else 1, live=not compress),
                *obj.shape[1:],
            ),
            fillvalue=obj.fillvalue,
            **(COMPRESSION if compress else {}),
        )
        if name == "overhead":
            ds.attrs["columns"] = list(OVERHEAD_COLUMNS)
        block = max(1, _BLOCK_BYTES * n // max(nbytes, 1))
        for start in range(0, n, block):
            stop = min(n, start + block)
            ds[start:stop] = run._read(name, slice(start, stop))
    n_events = len(dst["events"])
    dst["counts"][:] = np.array([n_steps, n_epochs, n_events], np.int64)
