"""The labelled EM stack every loader returns, per-image standardisation and the train/val split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradflow.errors import GradflowError


@dataclass(frozen=True)
class EMVolume:
    """A stack of labelled EM slices.

    ``images``: ``[N, H, W]`` float32, each slice standardised by its own mean and std.
    ``labels``: ``[N, H, W]`` float32, membrane = 1, cell interior = 0.
    ``source``: a one-line description for the run file's config.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.shape != self.labels.shape:
            raise ValueError(
                f"images {self.images.shape} and labels {self.labels.shape} "
                "must be two [N, H, W] arrays of one shape"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(H, W)`` of every slice."""
        return int(self.images.shape[1]), int(self.images.shape[2])


def standardise(images: np.ndarray) -> np.ndarray:
    """Each ``[H, W]`` slice of ``images`` minus its mean, over its std, as float32."""
    x = images.astype(np.float64)
    mean = x.mean(axis=(-2, -1), keepdims=True)
    std = x.std(axis=(-2, -1), keepdims=True)
    # A constant slice has std 0: centre it and leave its scale alone.
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def split(volume: EMVolume, n_val: int = 5) -> tuple[EMVolume, EMVolume]:
    """``(train, val)``: the last ``n_val`` slices validate, the others train.

    The default is the paper's split of the 30 ISBI 2012 training slices: slices 0-24
    train, slices 25-29 validate. ``n_val=0`` gives an empty validation volume.
    """
    n = len(volume)
    if not 0 <= n_val < n:
        raise GradflowError(
            f"cannot hold out {n_val} validation slices from {n} slices of {volume.source}"
        )
    cut = n - n_val
    train = EMVolume(
        volume.images[:cut], volume.labels[:cut], f"{volume.source}, slices 0-{cut - 1}"
    )
    val_source = f"{volume.source}, slices {cut}-{n - 1}" if n_val else f"{volume.source}, none"
    val = EMVolume(volume.images[cut:], volume.labels[cut:], val_source)
    return train, val
