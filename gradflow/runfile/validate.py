"""Run files from anyone: opened without hanging, checked against the schema before use.

A run file may come from someone else and may be damaged or crafted. Before any of its data
is used, :func:`~gradflow.runfile.opening.open_hdf5` and :func:`check_layout` make sure that

- opening it cannot hang: a file is opened in HDF5's plain read mode, which fails at once on
  a bad metadata checksum; only a file whose superblock says a writer has it open (a live
  run, or a writer that was killed) is opened in SWMR mode, and then with a bounded number
  of metadata read attempts (HDF5's default retries a bad checksum with doubling sleeps for
  many minutes, uninterruptibly);
- it holds only the schema's own objects, reached by hard links and stored inside the file:
  no soft or external links, no external storage, no virtual datasets, no unknown filters;
- every shape agrees with ``/counts`` and with the bytes the file holds, and the tables
  read whole fit :data:`TABLE_BYTES`, so that reading a file cannot take more memory than
  :data:`READ_BUDGET_BYTES`; every chunk of deflated data is checked, before HDF5 reads it,
  to inflate to no more than its declared size (:mod:`gradflow.runfile.inflate`);
- attributes have the schema's types, ``schema_version`` is a supported int, ``config`` is
  a JSON object, names are UTF-8, and text is returned free of control characters.

Every problem is one :class:`GradflowError` line. This module checks a file that is open;
:mod:`gradflow.runfile.opening` opens it. It does not import torch.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gradflow.errors import GradflowError
from gradflow.runfile.inflate import ChunkCheck

# The most memory that reading one run file's data takes (info, plot, report, serve,
# open_run), in parts: the tables read whole (everything but per-layer statistics), one
# chunk (HDF5 inflates a whole chunk to read one row of it, into a buffer it doubles), one
# block of rows of a per-layer statistic, and its time bins (sums and counts, float64).
READ_BUDGET_BYTES = 2**30
TABLE_BYTES = READ_BUDGET_BYTES // 2
MAX_CHUNK_BYTES = READ_BUDGET_BYTES // 16
BLOCK_BYTES = READ_BUDGET_BYTES // 32
BIN_BYTES = READ_BUDGET_BYTES // 16
# Deflate expands at most 1032-fold; a little more for its headers.
MAX_EXPANSION = 1100
SLACK_BYTES = 64 * 1024  # unwritten fixed-size tables (names) read as fill values
MAX_ATTR_BYTES = 16 * 2**20
MAX_STRING_BYTES = 4096
_ALLOWED_FILTERS = {h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32}
_STEPS, _EPOCHS, _EVENTS = 0, 1, 2  # positions in /counts
_STRINGS = ("gradflow_version", "created", "torch_version", "device", "schedule")
_NUMBERS = ("budget", "budget_reached")  # the overhead budget a run was recorded under
_LAYER_FIELDS = {"name": "S", "kind": "S", "type": "S", "depth": "i", "n_params": "i", "shape": "S"}
# Written since tied parameters are shown; files without it still read (no aliases).
_LAYER_FIELDS_ALIASES = {**_LAYER_FIELDS, "aliases": "S"}
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
class CheckedLayout:
    """What :func:`check_layout` found: everything a reader needs before any data."""

    attrs: dict[str, Any]
    config: dict[str, Any]
    layers: list[dict[str, Any]]
    counts: tuple[int, int, int]
    datasets: dict[str, h5py.Dataset]  # every dataset of the schema, by path
    chunks: ChunkCheck  # every read of them goes through it
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


def check_layout(path: Path, f: h5py.File, max_version: int) -> CheckedLayout:
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
    chunks = ChunkCheck(path)

    counts_ds = _dataset(path, f, "counts")
    if counts_ds.shape != (3,) or counts_ds.dtype.kind not in "iu":
        raise _fail(path, "damaged run file (/counts is not 3 integers)")
    counts = read_counts(chunks, counts_ds)

    layers_ds = _dataset(path, f, "layers")
    has_aliases = "aliases" in (layers_ds.dtype.fields or {})
    fields = _LAYER_FIELDS_ALIASES if has_aliases else _LAYER_FIELDS
    _check_dtype(path, "layers", layers_ds, _Spec("V", 1, None, fields=fields))
    datasets: dict[str, h5py.Dataset] = {"counts": counts_ds, "layers": layers_ds}
    for name in _GROUPS:
        _group(path, f, name)
    for name, spec in _FIXED.items():
        datasets[name] = _dataset(path, f, name)
        _check_dtype(path, name, datasets[name], spec)
    _check_sizes(path, size, {"layers": layers_ds}, counts)  # before the table is read
    layers = _layers(chunks, layers_ds)
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

    scalar_names = read_names(chunks, "scalars/names", datasets)
    metric_names = read_names(chunks, "epochs/metrics/names", datasets)
    for table, names in (("scalars/values", scalar_names), ("epochs/metrics/values", metric_names)):
        width = datasets[table].shape[1]
        if width < len(names):
            raise _fail(
                path, f"damaged run file (/{table} has {width} columns for {len(names)} names)"
            )
    return CheckedLayout(
        attrs=attrs,
        config=config,
        layers=layers,
        counts=counts,
        datasets=datasets,
        chunks=chunks,
        probes=probes,
        epoch_stats=epoch_stats,
        scalar_names=scalar_names,
        metric_names=metric_names,
    )


def read_counts(chunks: ChunkCheck, counts_ds: h5py.Dataset) -> tuple[int, int, int]:
    """The committed rows of steps, epochs and events in ``/counts``, checked non-negative."""
    values = [int(v) for v in chunks.read("counts", counts_ds)]
    if any(v < 0 for v in values):
        raise _fail(chunks.path, f"damaged run file (/counts holds negative rows: {values})")
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


def _per_layer(name: str) -> bool:
    """Whether ``/name`` is a per-layer statistic (read in blocks of rows, never whole)."""
    return name.startswith("stats/") or (name.startswith("epochs/") and name not in _FIXED)


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
    tables = 0
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
        tables += 0 if _per_layer(name) else wanted
    if tables > TABLE_BYTES:
        raise _fail(
            path,
            f"refused: its tables hold {tables} bytes unpacked, more than gradflow reads "
            f"of one file ({TABLE_BYTES} bytes)",
        )


def _attrs(path: Path, f: h5py.File) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw in f.attrs.keys():  # noqa: SIM118 (names only: no values read yet)
        name = printable(raw)
        if h5py.h5a.open(f.id, raw.encode()).get_storage_size() > MAX_ATTR_BYTES:
            raise _fail(path, f"damaged run file (attribute {name!r} is too large)")
        value = _attr_value(f.attrs[raw])
        # The storage size above is a descriptor's for variable-length text: check the text.
        if isinstance(value, str) and len(value) > MAX_ATTR_BYTES:
            raise _fail(path, f"damaged run file (attribute {name!r} is too large)")
        if value is None:
            raise _fail(path, f"damaged run file (attribute {name!r} has an unsupported type)")
        # config stays as stored (it is parsed, not shown); other text is shown as is.
        out[name] = printable(value) if isinstance(value, str) and name != "config" else value
    for name in _STRINGS:
        if name in out and not isinstance(out[name], str):
            raise _fail(path, f"damaged run file (attribute {name!r} is not text)")
    for name in _NUMBERS:
        if name in out and (isinstance(out[name], bool) or not isinstance(out[name], int | float)):
            raise _fail(path, f"damaged run file (attribute {name!r} is not a number)")
    probes = out.get("recorded_probes", [])
    if not (isinstance(probes, list) and all(isinstance(p, str) for p in probes)):
        raise _fail(path, "damaged run file (attribute 'recorded_probes' is not a list of names)")
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
    codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    for code in codes:
        if code not in _ALLOWED_FILTERS:
            raise _fail(path, f"refused: /{name} uses HDF5 filter {code} (gzip only)")
        if codes.count(code) > 1:
            raise _fail(path, f"refused: /{name} applies HDF5 filter {code} twice")
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


def _texts(path: Path, values: list[bytes], what: str) -> list[str]:
    """``values`` as text; ``what`` names the ``{i}``-th of them in the error."""
    try:
        return [printable(raw.decode()) for raw in values]
    except UnicodeDecodeError:
        i = next(i for i, raw in enumerate(values) if not _is_utf8(raw))
        raise _fail(path, f"damaged run file ({what.format(i=i)} is not UTF-8)") from None


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _layers(chunks: ChunkCheck, ds: h5py.Dataset) -> list[dict[str, Any]]:
    # Column by column: row by row, a table of 10^5 layers took seconds.
    path = chunks.path
    table = chunks.read("layers", ds)
    if len(table) == 0:
        raise _fail(path, "damaged run file (no layers)")
    text = {
        field: _texts(path, table[field].tolist(), f"the {field} of layer {{i}}")
        for field in ("name", "kind", "type", "shape", "aliases")
        if field in (table.dtype.fields or {})
    }
    aliases = text.get("aliases", [""] * len(table))
    return [
        {
            "name": name,
            "kind": kind,
            "type": module_type,
            "depth": depth,
            "n_params": n_params,
            "shape": shape,
            "aliases": tuple(a for a in alias.split(",") if a),
        }
        for name, kind, module_type, depth, n_params, shape, alias in zip(
            text["name"],
            text["kind"],
            text["type"],
            table["depth"].tolist(),
            table["n_params"].tolist(),
            text["shape"],
            aliases,
            strict=True,
        )
    ]


def read_names(chunks: ChunkCheck, name: str, datasets: Mapping[str, h5py.Dataset]) -> list[str]:
    """The non-empty entries of a name list (``/scalars/names``, ``/epochs/metrics/names``)."""
    names = [bytes(v) for v in chunks.read(name, datasets[name]) if v]
    return _texts(chunks.path, names, f"a name in /{name}")
