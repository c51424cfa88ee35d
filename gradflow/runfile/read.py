"""Reading a run file: :func:`open_run` checks it, :class:`Run` reads it (also while live)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gradflow.errors import GradflowError, unknown_name
from gradflow.runfile.opening import in_child, open_hdf5
from gradflow.runfile.schema import HDF5_SIGNATURE, OVERHEAD_COLUMNS, SCHEMA_VERSION, Event, Layer
from gradflow.runfile.validate import (
    BLOCK_BYTES,
    CheckedLayout,
    check_layout,
    check_rows,
    printable,
    read_counts,
    read_names,
)


class Run:
    """A run file opened for reading; safe on files that are still being written.

    Arrays are read on access. ``refresh()`` picks up rows a live writer added since.
    Text read from the file (layer, statistic and metric names, attributes, events) comes
    without control characters; ``config`` is the stored JSON object.
    """

    def __init__(self, path: Path, file: h5py.File, layout: CheckedLayout) -> None:
        self._f = file
        self._layout = layout
        self.path = path
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
            counts = read_counts(self._layout.chunks, counts_ds)
            for ds in self._datasets.values():
                # Only growing datasets have extents to re-read; refreshing a fixed-size one
                # (the name lists, written in place) fails in HDF5 once the writer wrote it.
                if ds.maxshape != ds.shape or ds.chunks is not None:
                    ds.refresh()
            check_rows(self.path, self.path.stat().st_size, self._datasets, counts)
            # A name is written before the first row that uses it is counted.
            layout = self._layout
            layout.scalar_names = read_names(layout.chunks, "scalars/names", self._datasets)
            layout.metric_names = read_names(layout.chunks, "epochs/metrics/names", self._datasets)
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise GradflowError(f"{self.path}: damaged run file ({_first_line(err)})") from err
        self.n_steps, self.n_epochs, self.n_events = counts

    def _read(self, key: str, rows: slice | None = None) -> np.ndarray:
        """Rows of a checked dataset (deflated chunks checked first, see
        :mod:`gradflow.runfile.inflate`); HDF5's errors on damaged data as one line."""
        try:
            return self._layout.chunks.read(key, self._datasets[key], rows)
        except (OSError, RuntimeError, ValueError) as err:
            raise GradflowError(
                f"{self.path}: damaged run file (/{key}: {_first_line(err)})"
            ) from err

    # -- description ------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The file's name in messages (the one its chunk checks give too)."""
        return self._layout.chunks.path

    @path.setter
    def path(self, value: Path) -> None:
        self._layout.chunks.path = value

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

    @property
    def schedule(self) -> str | None:
        """How the recorded steps were chosen (``every 5``, ``budget 0.02``, see
        :func:`gradflow.schedule.describe`); None in files written before it was stored."""
        value = self.attrs.get("schedule")
        return value if isinstance(value, str) else None

    @property
    def recorded_probes(self) -> list[str] | None:
        """The probes the Recorder was given, in its order; None in files written before
        they were stored."""
        value = self.attrs.get("recorded_probes")
        return list(value) if isinstance(value, list) else None

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
        name: str | None = None,
        rows: slice | None = None,
        layers: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """One statistic's values, per recorded row and layer.

        Args:
            probe: the probe (``param``), or the whole name (``param/grad_norm``) with
                ``name`` left out.
            name: the statistic (``grad_norm``).
            rows: the recorded rows to read (a slice); all by default.
            layers: the layer indices to read; all by default.

        Returns:
            float32 [T, L] for a step statistic, [E, L] for ``epoch/...``.
        """
        if name is None:
            probe, slash, name = probe.partition("/")
            if not (slash and probe and name):
                raise GradflowError(
                    f"statistic {probe + slash + name!r}: expected PROBE/NAME, e.g. param/grad_norm"
                )
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
        """Yield ``(first_row, block)`` pieces of a statistic, for runs too large for memory:
        at most ``block_rows`` rows and :data:`~gradflow.runfile.validate.BLOCK_BYTES` each,
        whole chunks of rows where that allows."""
        key = self._key(probe, name)
        ds = self._datasets[key]
        n = self.n_epochs if probe == "epoch" else self.n_steps
        block_rows = max(1, min(block_rows, BLOCK_BYTES // (ds.shape[1] * ds.dtype.itemsize or 1)))
        chunk = ds.chunks[0] if ds.chunks else block_rows
        if chunk <= block_rows:
            block_rows = block_rows // chunk * chunk
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
        """All per-step statistics in long format: step, layer, probe, stat, value (see
        :func:`gradflow.labelled.to_dataframe`)."""
        from gradflow.labelled import to_dataframe

        return to_dataframe(self)

    def to_xarray(self) -> Any:
        """The run as a labelled ``xarray.Dataset`` (see :mod:`gradflow.labelled`)."""
        from gradflow.labelled import to_xarray

        return to_xarray(self)

    def _repr_html_(self) -> str:
        """The notebook view: summary and heat map (see :mod:`gradflow.notebook`)."""
        from gradflow.notebook import run_html

        return run_html(self)

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
    process with a time limit (see :mod:`gradflow.runfile.validate`): opening any file, damaged or
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
        if fh.read(8) != HDF5_SIGNATURE:
            raise GradflowError(f"{p}: not an HDF5 file, so not a gradflow run")
    in_child(p, _check_run, "gradflow.runfile.read:_check_run")
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
