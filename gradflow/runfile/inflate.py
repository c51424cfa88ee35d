"""Reading deflated data from anyone within a memory bound.

HDF5's deflate filter inflates a chunk's whole stream, doubling its buffer until the stream
ends, whatever size the chunk declares: a 4 MB chunk of a crafted file took 4 GB of memory
to read. Before HDF5 reads a chunk of a deflated dataset, :class:`ChunkCheck` reads the
chunk's stored bytes and inflates them in steps of :data:`STEP_BYTES`, refusing the file
as soon as a chunk gives more than its declared size. Each chunk is checked once, when a
read first needs it. This module does not import torch.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import h5py
import numpy as np

from gradflow.errors import GradflowError

STEP_BYTES = 2**20  # what one inflation step may produce
_CHECKSUM_BYTES = 4  # Fletcher-32, added after the data by its filter


class ChunkCheck:
    """Reads of a run file's datasets; chunks of deflated ones are checked first.

    Args:
        path: the run file, for messages.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._checked: dict[str, set[tuple[int, ...]]] = {}
        self._stored: dict[str, tuple[tuple[int, ...], list[h5py.h5d.StoreInfo]]] = {}

    def read(self, name: str, ds: h5py.Dataset, rows: slice | None = None) -> np.ndarray:
        """``ds[rows]`` (all of it without ``rows``), each chunk it touches checked first.

        Raises:
            GradflowError: a chunk inflates beyond its declared size, or is no deflate
                stream; HDF5's own errors propagate for the caller to word.
        """
        n = ds.shape[0] if ds.shape else 1
        start, stop, _ = (rows or slice(None)).indices(n)
        self.check(name, ds, start, stop)
        return np.asarray(ds[()] if rows is None else ds[rows])

    def check(self, name: str, ds: h5py.Dataset, start: int, stop: int) -> None:
        """Check the stored chunks of ``ds`` that hold rows ``[start, stop)``."""
        plist = ds.id.get_create_plist()
        codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        if h5py.h5z.FILTER_DEFLATE not in codes or ds.chunks is None or stop <= start:
            return
        declared = int(np.prod(ds.chunks, dtype=object)) * ds.dtype.itemsize
        limit = declared + _CHECKSUM_BYTES * codes.count(h5py.h5z.FILTER_FLETCHER32)
        checked = self._checked.setdefault(name, set())
        first = start // ds.chunks[0] * ds.chunks[0]
        for info in self._chunks(name, ds):
            offset = tuple(info.chunk_offset)
            if offset in checked or not first <= offset[0] < stop:
                continue
            mask, raw = ds.id.read_direct_chunk(offset)
            stream = _deflated(raw, codes, mask)
            if stream is not None:
                where = f"{self.path}: damaged run file (/{name}: the chunk at {offset}"
                try:
                    size = _inflated_size(stream, limit)
                except zlib.error:
                    raise GradflowError(f"{where} is no deflate stream)") from None
                if size is None:
                    raise GradflowError(f"{where} inflates beyond its {declared} bytes)")
            checked.add(offset)

    def _chunks(self, name: str, ds: h5py.Dataset) -> list[h5py.h5d.StoreInfo]:
        """The stored chunks of ``ds`` (listed again when its extent changed)."""
        shape = tuple(ds.shape)
        known = self._stored.get(name)
        if known is None or known[0] != shape:
            found: list[h5py.h5d.StoreInfo] = []
            ds.id.chunk_iter(found.append)
            size = ds.file.id.get_filesize()  # the path may name another file by now
            if any(info.size > size for info in found):
                raise GradflowError(
                    f"{self.path}: damaged run file (/{name}: a chunk larger than the file)"
                )
            known = self._stored[name] = (shape, found)
        return known[1]


def _deflated(raw: bytes, codes: list[int], mask: int) -> bytes | None:
    """The deflate stream of a stored chunk, ``None`` where deflate was skipped for it (bit
    ``i`` of ``mask`` set: filter ``i`` skipped). Filters are undone in reverse order: a
    Fletcher-32 checksum applied after deflate is cut off the stream's end."""
    data = raw
    for i in reversed(range(len(codes))):
        if mask >> i & 1:
            if codes[i] == h5py.h5z.FILTER_DEFLATE:
                return None
            continue
        if codes[i] == h5py.h5z.FILTER_DEFLATE:
            return data
        if codes[i] == h5py.h5z.FILTER_FLETCHER32:
            data = data[:-_CHECKSUM_BYTES]
    return None


def _inflated_size(data: bytes, limit: int) -> int | None:
    """The bytes the zlib stream ``data`` inflates to (up to its end, as HDF5 reads it);
    ``None`` once beyond ``limit``, found without holding more than :data:`STEP_BYTES`.

    Raises:
        zlib.error: ``data`` is no zlib stream.
    """
    stream = zlib.decompressobj()
    size = 0
    while True:
        out = stream.decompress(data, STEP_BYTES)
        size += len(out)
        if size > limit:
            return None
        data = stream.unconsumed_tail
        if stream.eof or not out:
            return size
