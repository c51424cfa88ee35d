"""A user cache of synthetic EM volumes: one file per (seed, slices, size, generator).

Building the default volume (30 slices of 512 px) takes seconds, and far longer on a busy
machine, so ``gradflow record`` keeps it in ``$GRADFLOW_CACHE_DIR``, else
``$XDG_CACHE_HOME/gradflow``, else ``~/.cache/gradflow``. An entry is written atomically
and trusted only when its shapes, dtypes, label values and SHA-256 check out; anything
else is rebuilt. The key holds the numpy and scipy versions too, because the generator's
random streams and filters are theirs: a cached volume always equals a freshly built one.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy

from gradflow.em.data.synthetic import GENERATOR_VERSION, synthetic_source, synthetic_volume
from gradflow.em.data.volume import EMVolume
from gradflow.safefile import atomic_write
from gradflow.usercache import cache_dir

Say = Callable[[str], None]


def cache_path(n: int, size: int, seed: int) -> Path:
    """Where the synthetic volume of ``(n, size, seed)`` is cached."""
    key = json.dumps([GENERATOR_VERSION, seed, n, size, np.__version__, scipy.__version__]).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return cache_dir() / f"synthetic-seed{seed}-{n}x{size}px-{digest}.npz"


def cached_synthetic_volume(n: int, size: int, seed: int, say: Say | None = None) -> EMVolume:
    """:func:`~gradflow.em.data.synthetic_volume` ``(n, size, seed)``, from the cache when a
    sound entry is there, else built and cached. ``say`` hears what is being done."""
    tell = say if say is not None else _silent
    what = f"the synthetic EM volume (seed {seed}, {n} x {size} px)"
    path = cache_path(n, size, seed)
    if path.exists():
        try:
            images, labels = _read(path, n, size)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            tell(f"cached {what} at {path} is unusable ({err}); building it again")
        else:
            tell(f"loading {what} from {path}")
            return EMVolume(images, labels, synthetic_source(n, size, seed))
    tell(f"building {what}...")
    volume = synthetic_volume(n, size, seed)
    try:
        _write(path, volume)
    except OSError as err:
        tell(f"could not cache it at {path}: {err.strerror or err}")
    return volume


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    sha = hashlib.sha256()
    for array in (images, labels):
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def _write(path: Path, volume: EMVolume) -> None:
    labels = volume.labels.astype(np.uint8)  # exact: the labels are 0 or 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, mode=0o600) as f:
        np.savez(f, images=volume.images, labels=labels, sha256=_digest(volume.images, labels))


def _read(path: Path, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The entry's (images, labels), or ValueError when anything about it is off."""
    with np.load(path, allow_pickle=False) as entry:
        images, labels, sha = entry["images"], entry["labels"], str(entry["sha256"])
    shape = (n, size, size)
    if images.shape != shape or labels.shape != shape:
        raise ValueError(f"shapes {images.shape} and {labels.shape}, expected {shape}")
    if images.dtype != np.float32 or labels.dtype != np.uint8:
        raise ValueError(f"dtypes {images.dtype} and {labels.dtype}, expected float32 and uint8")
    if _digest(images, labels) != sha:
        raise ValueError("its checksum does not match its data")
    if labels.max(initial=0) > 1:
        raise ValueError("labels other than 0 and 1")
    return images, labels.astype(np.float32)


def _silent(text: str) -> None:
    """Hears nothing."""
