"""EM segmentation data: ISBI 2012 or a built-in synthetic stack, split, cropped and augmented."""

from __future__ import annotations

from pathlib import Path

from gradflow.em.data.augment import Augmentation, augment_pair, random_crop
from gradflow.em.data.batches import epoch_batches, steps_per_epoch
from gradflow.em.data.cache import Say, cache_dir, cached_synthetic_volume
from gradflow.em.data.isbi import load_isbi
from gradflow.em.data.synthetic import synthetic_volume
from gradflow.em.data.volume import EMVolume, split, standardise

__all__ = [
    "Augmentation",
    "EMVolume",
    "augment_pair",
    "cache_dir",
    "cached_synthetic_volume",
    "epoch_batches",
    "load_dataset",
    "load_isbi",
    "random_crop",
    "split",
    "standardise",
    "steps_per_epoch",
    "synthetic_volume",
]


def load_dataset(
    path: str | Path | None,
    *,
    seed: int = 0,
    n_synthetic: int = 30,
    synthetic_size: int = 512,
    say: Say | None = None,
) -> EMVolume:
    """The labelled slices at ``path`` (see :func:`load_isbi`), or synthetic ones.

    ``None`` or ``"synthetic"`` gives ``n_synthetic`` synthetic slices of ``synthetic_size``
    px generated from ``seed`` (see :func:`synthetic_volume`), kept in the user cache (see
    :mod:`gradflow.em.data.cache`); ``seed`` is unused for real data. ``say`` hears one line
    on what is being loaded or built.
    """
    if path is None or str(path) == "synthetic":
        return cached_synthetic_volume(n_synthetic, synthetic_size, seed, say)
    if say is not None:
        say(f"loading ISBI 2012 from {path}...")
    return load_isbi(path)
