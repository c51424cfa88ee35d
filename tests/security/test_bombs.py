"""Decompression bombs: a few-MB run file whose deflated chunks, or whose tables read whole,
would inflate to gigabytes is refused in one line, fast, by every reader, with bounded
peak memory (measured with ``getrusage`` in a fresh process)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from runfiles import write_run, zeros_stream

from gradflow.errors import GradflowError
from gradflow.runfile import open_run
from gradflow.runfile.inflate import _inflated_size
from gradflow.runfile.validate import TABLE_BYTES

PEAK_BYTES = 500 * 2**20  # the promise tested: a refused bomb raises the peak no further
LIMIT_S = 10.0


def test_zeros_stream_is_what_it_says() -> None:
    n = 5 * 2**20
    stream = zeros_stream(n)
    assert zlib.decompress(stream) == b"\0" * n and len(stream) < n // 500


@pytest.mark.parametrize("level", [1, 6, 9])
def test_inflated_size_is_zlibs(level: int) -> None:
    """The bounded count against zlib's own decompression, on random, repetitive and
    empty data, at the limit and one byte below it."""
    rng = random.Random(level)
    payloads = [
        b"",
        bytes(rng.randrange(256) for _ in range(70_000)),
        b"layer.0.conv " * 300_000,
        np.random.default_rng(level).lognormal(size=50_000).astype(np.float32).tobytes(),
    ]
    for payload in payloads:
        stream = zlib.compress(payload, level)
        size = len(zlib.decompress(stream))
        assert _inflated_size(stream, size) == size == len(payload)
        if size:
            assert _inflated_size(stream, size - 1) is None


def _replace_stat(path: Path, chunk: bytes, name: str = "stats/param/grad_norm") -> None:
    """Statistic ``/name`` as one deflated chunk of the given stored bytes."""
    with h5py.File(path, "r+") as f:
        shape = f[name].shape
        del f[name]
        ds = f.create_dataset(
            name, shape=shape, maxshape=(None, shape[1]), chunks=shape, dtype=np.float32,
            compression="gzip",
        )  # fmt: skip
        ds.id.write_direct_chunk((0, 0), chunk, 0)


def test_a_chunk_of_its_declared_size_reads_one_byte_more_is_refused(tmp_path: Path) -> None:
    path = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=6)
    with h5py.File(path, "r") as f:
        shape = f["stats/param/grad_norm"].shape
    values = np.random.default_rng(0).lognormal(size=shape).astype(np.float32)
    _replace_stat(path, zlib.compress(values.tobytes()))
    with open_run(path) as run:
        assert np.array_equal(run.stat("param", "grad_norm"), values)
    _replace_stat(path, zlib.compress(values.tobytes() + b"\0"))
    with open_run(path) as run, pytest.raises(GradflowError, match="inflates beyond its"):
        run.stat("param", "grad_norm")
    _replace_stat(path, b"not a zlib stream")
    with open_run(path) as run, pytest.raises(GradflowError, match="is no deflate stream"):
        run.stat("param", "grad_norm")


def test_checksummed_and_shuffled_chunks_read(tmp_path: Path) -> None:
    """Fletcher-32 and shuffle around deflate, as HDF5 writes them, read as written."""
    path = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=6)
    values = np.random.default_rng(1).lognormal(size=(6, 22)).astype(np.float32)
    with h5py.File(path, "r+") as f:
        del f["stats/param/grad_norm"]
        f.create_dataset(
            "stats/param/grad_norm", data=values, maxshape=(None, 22), chunks=(4, 22),
            compression="gzip", shuffle=True, fletcher32=True,
        )  # fmt: skip
    with open_run(path) as run:
        assert np.array_equal(run.stat("param", "grad_norm"), values)


def chunk_bomb(folder: Path) -> Path:
    """A 4 MB file: the one chunk (of 528 and 88 bytes) of two statistics inflates to
    2 GiB each; ``info`` reads the first, ``plot`` and ``report`` the second."""
    path = write_run(folder / "chunk-bomb.h5", epochs=1, steps_per_epoch=6)
    stream = zeros_stream(2 * 2**30)
    for name in ("stats/param/grad_nonfinite", "epochs/update_abs_mean"):
        _replace_stat(path, stream, name)
    return path


def table_bomb(folder: Path) -> Path:
    """A 2 MB file whose layer table, in chunks each inflating to its declared 57 MB,
    holds 2.1 million layers: 1.8 GB read whole, more than :data:`TABLE_BYTES`."""
    path = write_run(folder / "table-bomb.h5", epochs=1, steps_per_epoch=6)
    with h5py.File(path, "r+") as f:
        dtype = f["layers"].dtype
        del f["layers"]
        rows, chunks = 2**16, 32
        ds = f.create_dataset(
            "layers", shape=(rows * chunks,), chunks=(rows,), dtype=dtype, compression="gzip"
        )
        stream = zeros_stream(rows * dtype.itemsize, segment=dtype.itemsize * 2**10)
        for i in range(chunks):
            ds.id.write_direct_chunk((i * rows,), stream, 0)
    assert rows * chunks * dtype.itemsize > 3 * TABLE_BYTES
    return path


WORKER = Path(__file__).parent.parent / "scripts" / "readers.py"
ADDRESS_LIMIT = 6 * 2**30  # a bomb that got through stops there, not at the machine's memory


@pytest.mark.parametrize("make", [chunk_bomb, table_bomb])
def test_bombs_are_refused_fast_with_bounded_memory(tmp_path: Path, make: object) -> None:
    """``open_run`` and every reader on the file (``tests/scripts/readers.py``, in a fresh
    process): the chunk bomb opens (its chunks are checked when read) and every reader
    refuses it; the table bomb is refused by ``open_run``."""
    assert callable(make)
    path = make(tmp_path)
    assert path.stat().st_size < 6 * 2**20
    done = subprocess.run(
        [sys.executable, str(WORKER), str(ADDRESS_LIMIT), str(path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    answers = found["answers"]
    opens = make is chunk_bomb
    readers = {"open_run", "read", "info", "plot", "report", "serve"} if opens else {"open_run"}
    assert set(answers) == readers, answers
    for reader, answer in answers.items():
        if reader == "open_run" and opens:
            assert answer == "ok", answer
            continue
        assert answer.startswith(f"error: {path}: ") and "\n" not in answer, (reader, answer)
        assert "inflates beyond" in answer or "tables hold" in answer, (reader, answer)
    assert found["seconds"] < LIMIT_S, found
    assert found["peak"] < PEAK_BYTES, found
