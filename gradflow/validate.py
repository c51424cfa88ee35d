"""Run files from anyone: opened without hanging, checked against the schema before use.

A run file may come from someone else and may be damaged or crafted. Before any of its data
is used, :func:`open_hdf5` and :func:`check_layout` make sure that

- opening it cannot hang: a file is opened in HDF5's plain read mode, which fails at once on
  a bad metadata checksum; only a file whose superblock says a writer has it open (a live
  run, or a writer that was killed) is opened in SWMR mode, and then with a bounded number
  of metadata read attempts (HDF5's default retries a bad checksum with doubling sleeps for
  many minutes, uninterruptibly);
- it holds only the schema's own objects, reached by hard links and stored inside the file:
  no soft or external links, no external storage, no virtual datasets, no unknown filters;
- every shape agrees with ``/counts`` and with the bytes the file holds, so that reading it
  cannot allocate far more memory than the file's size suggests;
- attributes have the schema's types, ``schema_version`` is a supported int, ``config`` is
  a JSON object, names are UTF-8, and text is returned free of control characters.

Every problem is one :class:`GradflowError` line. This module does not import torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
import unicodedata
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py._objects import phil

from gradflow.errors import GradflowError

# 20 attempts sleep at most 2**20 ns (1 ms) in all; HDF5's default of 100 doubles its sleep
# up to hours. A live writer's torn metadata read is over within microseconds.
SWMR_READ_ATTEMPTS = 20
PROBE_SECONDS = 8.0  # of the 10 s in which any file gets an answer
# Deflate expands at most 1032-fold; a little more for its headers.
MAX_EXPANSION = 1100
SLACK_BYTES = 64 * 1024  # unwritten fixed-size tables (names) read as fill values
BUDGET_BYTES = 64 * 2**20  # beyond MAX_EXPANSION x the file size, over all datasets
MAX_CHUNK_BYTES = 64 * 2**20  # HDF5 decompresses a whole chunk to read one row of it
MAX_ATTR_BYTES = 16 * 2**20
MAX_STRING_BYTES = 4096
_ALLOWED_FILTERS = {h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32}
_STEPS, _EPOCHS, _EVENTS = 0, 1, 2  # positions in /counts
_FORK = hasattr(os, "fork")
_STRINGS = ("gradflow_version", "created", "torch_version", "device")
_LAYER_FIELDS = {"name": "S", "kind": "S", "type": "S", "depth": "i", "n_params": "i", "shape": "S"}
_EVENT_FIELDS = {
    "step": "i",
    "epoch": "i",
    "time": "f",
    "kind": "S",
    "probe": "S",
    "layer": "S",
    "detail": "S",
}


@dataclass(frozen=True)
class _Spec:
    """A dataset of the schema: accepted dtype kinds, dimensions, and which /counts entry
    gives the rows in use (``None``: all rows, for fixed tables)."""

    kinds: str
    ndim: int
    counter: int | None
    columns: int | None = None
    fields: Mapping[str, str] | None = None


_FIXED: dict[str, _Spec] = {
    "steps": _Spec("iu", 1, _STEPS),
    "epoch": _Spec("iu", 1, _STEPS),
    "time": _Spec("f", 1, _STEPS),
    "loss": _Spec("f", 1, _STEPS),
    "scale": _Spec("f", 1, _STEPS),
    "skipped": _Spec("iub", 1, _STEPS),
    "overhead": _Spec("f", 2, _STEPS, columns=4),
    "scalars/names": _Spec("S", 1, None),
    "scalars/values": _Spec("f", 2, _STEPS),
    "epochs/index": _Spec("iu", 1, _EPOCHS),
    "epochs/end_step": _Spec("iu", 1, _EPOCHS),
    "epochs/metrics/names": _Spec("S", 1, None),
    "epochs/metrics/values": _Spec("f", 2, _EPOCHS),
    "events": _Spec("V", 1, _EVENTS, fields=_EVENT_FIELDS),
}
_GROUPS = ("scalars", "epochs", "epochs/metrics")
_EPOCH_TABLES = {"index", "end_step", "metrics"}


@dataclass
class Layout:
    """What :func:`check_layout` found: everything a reader needs before any data."""

    attrs: dict[str, Any]
    config: dict[str, Any]
    layers: list[dict[str, Any]]
    counts: tuple[int, int, int]
    datasets: dict[str, h5py.Dataset]  # every dataset of the schema, by path
    probes: dict[str, list[str]]
    epoch_stats: list[str]
    scalar_names: list[str]
    metric_names: list[str]


def printable(text: str) -> str:
    """``text`` with control and format characters (terminal escapes, bidi overrides,
    undecodable bytes) replaced by U+FFFD, so that it shows as the text it is."""
    if text.isprintable():
        return text
    return "".join(
        "\ufffd" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co") else ch for ch in text
    )


def _fail(path: Path, what: str) -> GradflowError:
    return GradflowError(f"{path}: {what}")


# ---------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------
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
        "from gradflow.validate import _answer\n"
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


# ---------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------
def check_layout(path: Path, f: h5py.File, max_version: int) -> Layout:
    """Check an open file against the run-file schema (v1 up to ``max_version``).

    Raises :class:`GradflowError` naming the first problem; HDF5 errors met on the way
    propagate for the caller to word.
    """
    attrs = _attrs(path, f)
    if "schema_version" not in attrs or "layers" not in f or "counts" not in f:
        raise _fail(path, "an HDF5 file, but not a gradflow run (no schema_version)")
    version = attrs["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(path, f"damaged run file (schema_version {version!r} is not a positive int)")
    if version > max_version:
        raise _fail(
            path,
            f"written with run-file schema v{version}; this gradflow reads up to "
            f"v{max_version} (upgrade gradflow)",
        )
    config = _config(path, attrs.get("config", "{}"))
    size = path.stat().st_size

    counts_ds = _dataset(path, f, "counts")
    if counts_ds.shape != (3,) or counts_ds.dtype.kind not in "iu":
        raise _fail(path, "damaged run file (/counts is not 3 integers)")
    counts = read_counts(path, counts_ds)

    layers_ds = _dataset(path, f, "layers")
    _check_dtype(path, "layers", layers_ds, _Spec("V", 1, None, fields=_LAYER_FIELDS))
    datasets: dict[str, h5py.Dataset] = {"counts": counts_ds, "layers": layers_ds}
    for name in _GROUPS:
        _group(path, f, name)
    for name, spec in _FIXED.items():
        datasets[name] = _dataset(path, f, name)
        _check_dtype(path, name, datasets[name], spec)
    _check_sizes(path, size, {"layers": layers_ds}, counts)  # before the table is read
    layers = _layers(path, layers_ds)
    n_layers = len(layers)

    probes: dict[str, list[str]] = {}
    specs: dict[str, _Spec] = dict(_FIXED)
    if "stats" in f:
        stats = _group(path, f, "stats")
        for probe in _members(path, stats, "stats"):
            group = _group(path, f, f"stats/{probe}")
            probes[probe] = sorted(_members(path, group, f"stats/{probe}"))
            for stat in probes[probe]:
                specs[f"stats/{probe}/{stat}"] = _Spec("f", 2, _STEPS, columns=n_layers)
    members = _members(path, _group(path, f, "epochs"), "epochs")
    epoch_stats = sorted(name for name in members if name not in _EPOCH_TABLES)
    for stat in epoch_stats:
        specs[f"epochs/{stat}"] = _Spec("f", 2, _EPOCHS, columns=n_layers)
    for name, spec in specs.items():
        if name not in datasets:
            datasets[name] = _dataset(path, f, name)
            _check_dtype(path, name, datasets[name], spec)
    check_rows(path, size, datasets, counts)

    scalar_names = read_names(path, "scalars/names", datasets)
    metric_names = read_names(path, "epochs/metrics/names", datasets)
    for table, names in (("scalars/values", scalar_names), ("epochs/metrics/values", metric_names)):
        width = datasets[table].shape[1]
        if width < len(names):
            raise _fail(
                path, f"damaged run file (/{table} has {width} columns for {len(names)} names)"
            )
    return Layout(
        attrs=attrs,
        config=config,
        layers=layers,
        counts=counts,
        datasets=datasets,
        probes=probes,
        epoch_stats=epoch_stats,
        scalar_names=scalar_names,
        metric_names=metric_names,
    )


def read_counts(path: Path, counts_ds: h5py.Dataset) -> tuple[int, int, int]:
    """The committed rows of steps, epochs and events in ``/counts``, checked non-negative."""
    values = [int(v) for v in counts_ds[()]]
    if any(v < 0 for v in values):
        raise _fail(path, f"damaged run file (/counts holds negative rows: {values})")
    return values[0], values[1], values[2]


def check_rows(
    path: Path,
    size: int,
    datasets: Mapping[str, h5py.Dataset],
    counts: tuple[int, int, int],
) -> None:
    """Every series holds the rows ``/counts`` says, and reading them cannot allocate far
    beyond the file's size. A forged ``/counts`` larger than the rows held is refused."""
    for name, ds in datasets.items():
        spec = _spec_of(name)
        if spec.counter is None:
            continue
        need = counts[spec.counter]
        if ds.shape[0] < need:
            what = ("steps", "epochs", "events")[spec.counter]
            raise _fail(
                path,
                f"damaged run file (/counts says {need} {what}, but /{name} holds {ds.shape[0]})",
            )
    _check_sizes(path, size, datasets, counts)


def _spec_of(name: str) -> _Spec:
    if name in _FIXED:
        return _FIXED[name]
    if name.startswith("stats/"):
        return _Spec("f", 2, _STEPS)
    if name.startswith("epochs/"):
        return _Spec("f", 2, _EPOCHS)
    return _Spec("", 0, None)  # counts, layers: read whole


def _check_sizes(
    path: Path,
    size: int,
    datasets: Mapping[str, h5py.Dataset],
    counts: tuple[int, int, int],
) -> None:
    total = 0
    for name, ds in datasets.items():
        spec = _spec_of(name)
        rows = ds.shape[0] if spec.counter is None else min(counts[spec.counter], ds.shape[0])
        row_bytes = int(np.prod(ds.shape[1:], dtype=object)) * ds.dtype.itemsize
        wanted = rows * row_bytes
        plist = ds.id.get_create_plist()
        filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        stored = min(ds.id.get_storage_size(), size)
        expansion = MAX_EXPANSION if h5py.h5z.FILTER_DEFLATE in filters else 1
        if wanted > expansion * stored + SLACK_BYTES:
            raise _fail(
                path,
                f"damaged run file (/{name}: {rows} rows of {row_bytes} bytes, "
                f"but the file holds {stored} bytes of it)",
            )
        if ds.chunks is not None:
            chunk = int(np.prod(ds.chunks, dtype=object)) * ds.dtype.itemsize
            if chunk > MAX_CHUNK_BYTES:
                raise _fail(path, f"damaged run file (/{name}: chunks of {chunk} bytes)")
        total += wanted
    if total > MAX_EXPANSION * size + BUDGET_BYTES:
        raise _fail(path, f"damaged run file ({total} bytes of data in a {size}-byte file)")


def _attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw in f.attrs.keys():  # noqa: SIM118 (names only: no values read yet)
        name = printable(raw)
        if h5py.h5a.open(f.id, raw.encode()).get_storage_size() > MAX_ATTR_BYTES:
            raise _fail(path, f"damaged run file (attribute {name!r} is too large)")
        value = _attr_value(f.attrs[raw])
        if value is None:
            raise _fail(path, f"damaged run file (attribute {name!r} has an unsupported type)")
        # config stays as stored (it is parsed, not shown); other text is shown as is.
        out[name] = printable(value) if isinstance(value, str) and name != "config" else value
    for name in _STRINGS:
        if name in out and not isinstance(out[name], str):
            raise _fail(path, f"damaged run file (attribute {name!r} is not text)")
    return out


def _attr_value(value: Any) -> Any:
    """A plain Python value of an attribute, ``None`` if of an unsupported type."""
    if isinstance(value, bytes | np.bytes_):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufSO" and value.ndim == 1:
        items = [_attr_value(v) for v in value]
        return None if any(v is None for v in items) else items
    return None


def _config(path: Path, text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        raise _fail(path, "damaged run file (config is not JSON text)")
    try:
        config = json.loads(text)
    except RecursionError:
        raise _fail(path, "damaged run file (config is nested too deeply)") from None
    except ValueError as err:
        raise _fail(path, f"damaged run file (config is not JSON: {err})") from None
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise _fail(path, f"damaged run file (config is a JSON {kind}, not an object)")
    return config


def _group(path: Path, parent: h5py.Group, name: str) -> h5py.Group:
    obj = _object(path, parent, name)
    if not isinstance(obj, h5py.h5g.GroupID):
        raise _fail(path, f"damaged run file (/{name} is not a group)")
    return h5py.Group(obj)


def _dataset(path: Path, parent: h5py.Group, name: str) -> h5py.Dataset:
    obj = _object(path, parent, name)
    if not isinstance(obj, h5py.h5d.DatasetID):
        raise _fail(path, f"damaged run file (/{name} is not a dataset)")
    plist = obj.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise _fail(path, f"refused: /{name} is a virtual dataset (data from other files)")
    if plist.get_external_count():
        raise _fail(path, f"refused: /{name} is stored in an external file")
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code not in _ALLOWED_FILTERS:
            raise _fail(path, f"refused: /{name} uses HDF5 filter {code} (gzip only)")
    return h5py.Dataset(obj)


def _object(path: Path, parent: h5py.Group, name: str) -> Any:
    """Open ``parent/name`` following hard links only: each step of the path is checked."""
    where = parent.id
    for part in name.split("/"):
        key = part.encode()
        if not where.links.exists(key):
            raise _fail(path, f"damaged run file (no /{name})")
        kind = where.links.get_info(key).type
        if kind != h5py.h5l.TYPE_HARD:
            link = {h5py.h5l.TYPE_SOFT: "a soft", h5py.h5l.TYPE_EXTERNAL: "an external"}.get(
                kind, "a user-defined"
            )
            raise _fail(path, f"refused: /{name} is {link} link")
        where = h5py.h5o.open(where, key)
    return where


def _members(path: Path, group: h5py.Group, name: str) -> list[str]:
    """Link names in a group, which must be UTF-8."""
    members = []
    for raw in group.id:
        try:
            members.append(raw.decode())
        except UnicodeDecodeError:
            raise _fail(path, f"damaged run file (a name in /{name} is not UTF-8)") from None
        if not members[-1].isprintable() or not members[-1]:
            raise _fail(path, f"damaged run file (name {printable(members[-1])!r} in /{name})")
    return members


def _check_dtype(path: Path, name: str, ds: h5py.Dataset, spec: _Spec) -> None:
    dtype = ds.dtype
    if ds.shape is None or len(ds.shape) != spec.ndim:
        raise _fail(path, f"damaged run file (/{name} has shape {ds.shape}, not {spec.ndim}-D)")
    if spec.columns is not None and ds.shape[1] != spec.columns:
        raise _fail(
            path, f"damaged run file (/{name} has {ds.shape[1]} columns, not {spec.columns})"
        )
    if spec.fields is not None:
        fields = dtype.fields or {}
        kinds = {key: value[0].kind for key, value in fields.items()}
        if set(kinds) != set(spec.fields) or any(
            kinds[key] != kind for key, kind in spec.fields.items()
        ):
            raise _fail(path, f"damaged run file (/{name} is not the schema's compound table)")
        sizes = [value[0].itemsize for value in fields.values()]
        if max(sizes) > MAX_STRING_BYTES:
            raise _fail(path, f"damaged run file (/{name} has a field of {max(sizes)} bytes)")
        return
    limit = MAX_STRING_BYTES if dtype.kind == "S" else 8
    if dtype.kind not in spec.kinds or dtype.itemsize > limit:
        raise _fail(path, f"damaged run file (/{name} holds {dtype}, not the schema's type)")


def _text(path: Path, raw: bytes, what: str) -> str:
    try:
        return printable(raw.decode())
    except UnicodeDecodeError:
        raise _fail(path, f"damaged run file ({what} is not UTF-8)") from None


def _layers(path: Path, ds: h5py.Dataset) -> list[dict[str, Any]]:
    table = ds[()]
    if len(table) == 0:
        raise _fail(path, "damaged run file (no layers)")
    return [
        {
            "name": _text(path, bytes(r["name"]), f"the name of layer {i}"),
            "kind": _text(path, bytes(r["kind"]), f"the kind of layer {i}"),
            "type": _text(path, bytes(r["type"]), f"the type of layer {i}"),
            "depth": int(r["depth"]),
            "n_params": int(r["n_params"]),
            "shape": _text(path, bytes(r["shape"]), f"the shape of layer {i}"),
        }
        for i, r in enumerate(table)
    ]


def read_names(path: Path, name: str, datasets: Mapping[str, h5py.Dataset]) -> list[str]:
    """The non-empty entries of a name list (``/scalars/names``, ``/epochs/metrics/names``)."""
    return [_text(path, bytes(v), f"a name in /{name}") for v in datasets[name][()] if v]
