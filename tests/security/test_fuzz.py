"""Structure-aware fuzzing: valid run files mutated at the schema level (dtypes, shapes,
huge declared dimensions, extreme values, attribute types, extra objects, external storage,
decompression bombs, links, filters, deleted objects), 1 to 3 mutations a file, 300 files a
seed (``--fuzz-seed N``). Every reader (``open_run`` and every series and statistic,
``info``, the default ``plot`` figure, the ``report`` and ``serve`` data;
``tests/scripts/readers.py``) runs on each file in worker processes under an
address-space limit; each must give a result or one
``GradflowError`` line, within :data:`FILE_LIMIT_S` and under :data:`PEAK_BYTES` of
resident memory."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from runfiles import SyntheticRun, fcn_layers, zeros_stream

N_FILES = 300
WORKERS = 4  # processes, two at a time
FILE_LIMIT_S = 20.0  # every reader on one file (opening alone is promised in 10 s)
PEAK_BYTES = 1536 * 2**20  # the 1 GiB read budget plus what the readers' imports take
ADDRESS_LIMIT = 6 * 2**30  # setrlimit(RLIMIT_AS) of the workers: a bomb fails there
WORKER = Path(__file__).parent.parent / "scripts" / "readers.py"
Mutation = Callable[[h5py.File, random.Random, Path], str]

EXTREMES_F = [np.nan, np.inf, -np.inf, -1.0, 0.0, 3.4e38, -3.4e38, 1e-45, 1.8e308]
EXTREMES_I = [-1, 0, 2**31 - 1, -(2**31), 2**62, -(2**62), 10**9]


def _base(folder: Path) -> Path:
    path = folder / "base.h5"
    with SyntheticRun(path, fcn_layers(blocks=1), steps_per_epoch=3) as run:
        run.steps(3).epoch().nonfinite(4, "down1.0.conv").steps(3).epoch()
    return path


DATASETS = ["counts", "layers", "steps", "epoch", "time", "loss", "scale", "skipped",
            "overhead", "scalars/names", "scalars/values", "events", "epochs/index",
            "epochs/end_step", "epochs/metrics/names", "epochs/metrics/values",
            "epochs/update_abs_mean", "epochs/update_ratio", "stats/param/grad_norm",
            "stats/param/update_ratio", "stats/param/grad_nonfinite",
            "stats/activation/zero_fraction", "stats/grad_output/norm"]  # fmt: skip


def _pick(
    f: h5py.File, rng: random.Random, test: Callable[[h5py.Dataset], bool] = lambda ds: True
) -> str:
    """A dataset of the schema still in ``f`` for which ``test`` holds."""
    for name in rng.sample(DATASETS, len(DATASETS)):
        obj = f.get(name)
        if isinstance(obj, h5py.Dataset) and test(obj):
            return name
    raise KeyError("no dataset left to mutate")


def _recreate(f: h5py.File, name: str, **options: object) -> h5py.Dataset:
    del f[name]
    return f.create_dataset(name, **options)  # type: ignore[arg-type]


def wrong_dtype(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = _pick(f, rng)
    old = f[name]
    dtype = rng.choice(["i1", "u8", "f2", "f8", "?", "S8", "c8", "i8", [("a", "i4")], "f4"])
    data = np.zeros(old.shape, dtype=np.dtype(dtype))
    if old.dtype.fields is None and np.dtype(dtype).fields is None and old.size:
        with np.errstate(all="ignore"):
            data[...] = old[()].astype(dtype) if old.dtype.kind != "S" else 0
    _recreate(f, name, data=data)
    return f"{name} as {dtype}"


def wrong_shape(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = _pick(f, rng)
    old = f[name]
    n = old.shape[0] if old.shape else 1
    shape = rng.choice([(), (0,), (n + 5,), (n, 3), (n, 13), (n, 12, 2), (1,), (n, 0), (0, 12)])
    _recreate(
        f,
        name,
        data=np.ones(shape, old.dtype) if old.dtype.fields is None else np.zeros(shape, old.dtype),
    )
    return f"{name} of shape {shape}"


def huge_dims(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = _pick(f, rng, lambda ds: ds.ndim >= 1)
    old = f[name]
    rows = rng.choice([2**31, 2**40, 2**50])
    shape = (rows, *old.shape[1:])
    compression = rng.choice([None, "gzip"])
    chunks = (rng.choice([1, 64, 1024]), *old.shape[1:])
    maxshape = (None, *old.shape[1:])
    options = {"maxshape": maxshape, "chunks": chunks, "compression": compression}
    _recreate(f, name, shape=shape, dtype=old.dtype, **options)
    if rng.random() < 0.5 and "counts" in f and f["counts"].shape == (3,):
        f["counts"][rng.randrange(3)] = rows
    return f"{name} declares {rows} rows"


def extreme_values(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = _pick(f, rng, lambda ds: bool(ds.size))
    ds = f[name]
    data = ds[()]
    flat = data.reshape(-1)
    fields = data.dtype.fields
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(flat))
        if fields:
            field = rng.choice(list(fields))
            kind = fields[field][0].kind
            if kind == "S":
                flat[i][field] = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
            else:
                value = np.array(rng.choice(EXTREMES_F if kind == "f" else EXTREMES_I))
                with np.errstate(all="ignore"):
                    flat[i][field] = value.astype(fields[field][0])
        elif data.dtype.kind == "f":
            flat[i] = rng.choice(EXTREMES_F)
        elif data.dtype.kind in "iu":
            with np.errstate(all="ignore"):
                flat[i] = np.array(rng.choice(EXTREMES_I)).astype(data.dtype)
        elif data.dtype.kind == "S":
            flat[i] = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
    ds[...] = data
    return f"extreme values in {name}"


ATTR_VALUES: list[object] = [
    7, -1, 2**63 - 1, float("nan"), float("inf"), "text", b"\xff\xfe", np.arange(3),
    np.zeros(0), True, np.zeros(2, [("a", "i4")]), '{"model": {"name": 5}}', '{"model": null}',
    "[]", '{"a": NaN, "b": Infinity}', '{"model": "' + "x" * 10_000 + '"}', 1.5, "2",
]  # fmt: skip
ATTR_NAMES = ["schema_version", "config", "device", "created", "gradflow_version",
              "torch_version", "budget", "budget_reached", "optimizer", "flush_every",
              "kernel_backend", "junk"]  # fmt: skip


def attribute(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = rng.choice(ATTR_NAMES)
    value = rng.choice(ATTR_VALUES)
    f.attrs[name] = value  # type: ignore[assignment]
    return f"attribute {name} = {str(value)[:20]}"


EXTRA_PLACES = ["junk", "stats/newprobe", "stats/param/extra", "epochs/extra", "scalars/extra",
                "stats/param/sub/deeper", "epochs/metrics/extra"]  # fmt: skip


def extra_object(f: h5py.File, rng: random.Random, _: Path) -> str:
    where = rng.choice(EXTRA_PLACES)
    if where in f:
        return "nothing"
    if rng.random() < 0.4:
        f.create_group(where)
    else:
        shape = rng.choice([(6, 12), (2, 12), (6,), (3, 3), (0, 12)])
        f.create_dataset(where, data=np.ones(shape, np.float32))
    return f"extra /{where}"


def external_storage(f: h5py.File, rng: random.Random, folder: Path) -> str:
    name = _pick(f, rng)
    old = f[name]
    secret = folder / "secret.bin"
    if not secret.exists():
        secret.write_bytes(b"root:x:0:0:secret".ljust(2**16, b"\0"))
    nbytes = max(1, int(np.prod(old.shape)) * old.dtype.itemsize)
    _recreate(f, name, shape=old.shape, dtype=old.dtype, external=[(secret, 0, nbytes)])
    return f"{name} stored in {secret.name}"


_zeros = functools.cache(zeros_stream)


def bomb(f: h5py.File, rng: random.Random, _: Path) -> str:
    """A chunk inflating far beyond its declared size, or a stream that is no zlib."""
    name = _pick(f, rng, lambda ds: ds.chunks is not None and bool(ds.size))
    old = f[name]
    chunk = old.chunks
    ds = _recreate(f, name, shape=old.shape, maxshape=old.maxshape, dtype=old.dtype,
                   chunks=chunk, compression="gzip")  # fmt: skip
    one_more = zlib.compress(b"\0" * (int(np.prod(chunk)) * old.dtype.itemsize + 1))
    stored = rng.choice([_zeros(2 * 2**30), _zeros(2**27, 2**17), b"garbage" * 9, one_more])
    ds.id.write_direct_chunk((0,) * old.ndim, stored, 0)
    return f"{name}: bomb chunk of {len(stored)} bytes"


def table_bomb(f: h5py.File, rng: random.Random, _: Path) -> str:
    """A table read whole declared at 600 MB in chunks that inflate to their size."""
    name = rng.choice(["layers", "events"])
    dtype = f[name].dtype
    rows = 2**14
    n_chunks = -(-600 * 2**20 // (rows * dtype.itemsize))
    ds = _recreate(f, name, shape=(rows * n_chunks,), maxshape=(None,), chunks=(rows,),
                   dtype=dtype, compression="gzip")  # fmt: skip
    stream = _zeros(rows * dtype.itemsize, dtype.itemsize * 2**10)
    for i in range(n_chunks):
        ds.id.write_direct_chunk((i * rows,), stream, 0)
    if name == "events" and "counts" in f and f["counts"].shape == (3,):
        f["counts"][2] = rows * n_chunks
    return f"/{name}: {rows * n_chunks} rows in {n_chunks} inflating chunks"


def link(f: h5py.File, rng: random.Random, folder: Path) -> str:
    name = _pick(f, rng)
    names = [n for n in DATASETS if n in f]
    kind = rng.choice(["soft", "external", "hard", "dangling", "cycle"])
    del f[name]
    if kind == "soft":
        f[name] = h5py.SoftLink("/" + rng.choice(names))
    elif kind == "external":
        f[name] = h5py.ExternalLink(str(folder / "base.h5"), "/" + name)
    elif kind == "hard":
        other = rng.choice([n for n in names if n != name])
        if other in f:
            f[name] = f[other]
    elif kind == "dangling":
        f[name] = h5py.SoftLink("/nowhere")
    else:
        f[name] = f["/"]
    return f"/{name} as a {kind} link"


def filters(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = _pick(f, rng, lambda ds: ds.ndim >= 1 and bool(ds.shape[0]))
    old = f[name]
    checksummed = {"fletcher32": True, "shuffle": True, "compression": "gzip"}
    options = rng.choice(
        [{"compression": "lzf"}, checksummed, {"scaleoffset": 2}, {"chunks": None}]
    )
    if old.dtype.fields is not None and "scaleoffset" in options:
        return "nothing"
    _recreate(f, name, data=old[()], **options)
    return f"{name} with {options}"


def delete(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = rng.choice([*DATASETS, "stats", "stats/param", "epochs", "scalars", "epochs/metrics"])
    del f[name]
    return f"no /{name}"


def fewer_rows(f: h5py.File, rng: random.Random, _: Path) -> str:
    name = _pick(f, rng, lambda ds: bool(ds.maxshape) and ds.maxshape[0] is None)
    f[name].resize(rng.randrange(f[name].shape[0] + 1), axis=0)
    return f"/{name} cut to {f[name].shape[0]} rows"


MUTATIONS: list[Mutation] = [
    wrong_dtype, wrong_shape, huge_dims, extreme_values, attribute, extra_object,
    external_storage, bomb, table_bomb, link, filters, delete, fewer_rows, extreme_values,
    extreme_values, attribute,
]  # fmt: skip


def crafted(base: Path, folder: Path, seed: int) -> dict[str, list[str]]:
    """:data:`N_FILES` mutated copies of ``base``; what was done to each, by file name."""
    rng = random.Random(seed)
    done: dict[str, list[str]] = {}
    while len(done) < N_FILES:
        path = folder / f"fuzz-{len(done):03d}.h5"
        shutil.copyfile(base, path)
        steps = []
        with h5py.File(path, "r+") as f:
            chosen = rng.sample(MUTATIONS, rng.randint(1, 3))
            # Declared sizes last: a later mutation reading the data would inflate them here.
            for mutate in sorted(chosen, key=lambda m: m in (huge_dims, bomb, table_bomb)):
                # h5py refuses some on what earlier mutations left: not applied then
                with contextlib.suppress(
                    ValueError, TypeError, KeyError, OSError, IndexError, OverflowError
                ):
                    steps.append(f"{mutate.__name__}: {mutate(f, rng, folder)}")
        if steps:
            done[path.name] = steps
    return done


def _run_worker(files: list[Path]) -> list[dict[str, object]]:
    done = subprocess.run(
        [sys.executable, str(WORKER), str(ADDRESS_LIMIT), *map(str, files)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_fuzz_schema_mutations(
    tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = request.config.getoption("--fuzz-seed")
    monkeypatch.chdir(tmp_path)
    base = _base(tmp_path)
    what = crafted(base, tmp_path, seed)
    files = sorted(tmp_path / name for name in what)
    with ThreadPoolExecutor(2) as pool:
        batches = pool.map(_run_worker, [files[i::WORKERS] for i in range(WORKERS)])
        lines = [line for batch in batches for line in batch]
    assert len(lines) == len(files) >= 300
    kinds = Counter(step.split(":")[0] for steps in what.values() for step in steps)
    assert set(kinds) == {m.__name__ for m in MUTATIONS}, kinds
    tally: Counter[str] = Counter()
    bad = []
    for line in lines:
        name, answers = str(line["file"]), line["answers"]
        assert isinstance(answers, dict)
        for reader, answer in answers.items():
            tally[f"{reader} {answer.split(':')[0]}"] += 1
            one_line = answer == "ok" or (answer.startswith("error: ") and "\n" not in answer)
            if not one_line:
                bad.append((name, what[name], reader, answer[:300]))
        if float(line["seconds"]) >= FILE_LIMIT_S:  # type: ignore[arg-type]
            bad.append((name, what[name], "seconds", line["seconds"]))
    peak = max(int(line["peak"]) for line in lines)  # type: ignore[call-overload]
    print(f"\n{len(files)} files (seed {seed}): {dict(sorted(tally.items()))}")
    print(f"peak resident memory of a worker: {peak / 2**20:.0f} MB")
    assert not bad, "\n".join(map(str, bad))
    assert peak < PEAK_BYTES, peak
    assert tally["open_run ok"] > N_FILES // 5 and tally["open_run error"] > N_FILES // 5, tally
    assert tally["plot ok"] > 0 and tally["report ok"] > 0, tally
