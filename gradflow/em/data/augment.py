"""Random crops of (image, label) pairs, optionally flipped, rotated, sheared and deformed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from gradflow.errors import GradflowError


@dataclass(frozen=True)
class Augmentation:
    """The random geometric transform applied to each training crop.

    The paper's recipe: flips, rotations up to 25 degrees and shear, with reflect padding.
    Elastic deformation (U-Net style: Gaussian displacements with ``elastic_std`` px std on
    an ``elastic_grid`` x ``elastic_grid`` grid, cubic-interpolated) is off by default.
    """

    flips: bool = True
    max_rotation_deg: float = 25.0
    max_shear_deg: float = 10.0
    elastic_std: float = 0.0
    elastic_grid: int = 3


def check_crop(crop: int, shape: tuple[int, int], source: str) -> None:
    """Raise a :class:`GradflowError` unless ``crop`` x ``crop`` fits in slices of ``shape``."""
    if crop < 1 or crop > min(shape):
        raise GradflowError(
            f"crop {crop}x{crop} does not fit the {shape[0]}x{shape[1]} slices of {source}"
        )


def random_crop(
    image: np.ndarray, label: np.ndarray, crop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A ``crop`` x ``crop`` window at a uniformly random position, cut out exactly."""
    r = int(rng.integers(0, image.shape[0] - crop + 1))
    c = int(rng.integers(0, image.shape[1] - crop + 1))
    return image[r : r + crop, c : c + crop].copy(), label[r : r + crop, c : c + crop].copy()


def augment_pair(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    aug: Augmentation = Augmentation(),
    *,
    crop: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A randomly transformed ``crop`` x ``crop`` window of ``(image, label)``.

    ``crop=None`` transforms the whole slice about its centre; otherwise the window's centre
    is random, chosen so the untransformed window lies inside the slice. Only the output
    window is computed, sampling the slice at transformed coordinates: the image bilinearly,
    the label by nearest neighbour (so it stays 0/1), and reflect padding wherever the
    transform reaches outside the slice. The same draws from ``rng`` in the same order make
    the result deterministic.
    """
    h, w = image.shape
    out_h, out_w = (h, w) if crop is None else (crop, crop)
    flip = rng.integers(0, 2, size=2) * 2 - 1 if aug.flips else np.ones(2, dtype=np.int64)
    angle = np.deg2rad(rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg))
    shear = np.tan(np.deg2rad(rng.uniform(-aug.max_shear_deg, aug.max_shear_deg)))
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(flip.astype(np.float64))

    u = np.arange(out_h) - (out_h - 1) / 2
    v = np.arange(out_w) - (out_w - 1) / 2
    grid = np.stack(np.meshgrid(u, v, indexing="ij")).reshape(2, -1)
    coords = matrix @ grid
    if aug.elastic_std > 0:
        coords += _elastic_displacement(rng, aug, out_h, out_w).reshape(2, -1)
    # Offsets keep the untransformed window on whole pixels, so identity maps exactly.
    top = 0 if crop is None else int(rng.integers(0, h - crop + 1))
    left = 0 if crop is None else int(rng.integers(0, w - crop + 1))
    coords[0] += top + (out_h - 1) / 2
    coords[1] += left + (out_w - 1) / 2
    new_image = ndi.map_coordinates(image, coords, order=1, mode="reflect")
    new_label = ndi.map_coordinates(label, coords, order=0, mode="reflect")
    return new_image.reshape(out_h, out_w), new_label.reshape(out_h, out_w)


def _elastic_displacement(
    rng: np.random.Generator, aug: Augmentation, h: int, w: int
) -> np.ndarray:
    """``[2, h, w]`` smooth displacements in pixels, cubic-interpolated from a coarse grid."""
    n = max(aug.elastic_grid, 2)
    coarse = rng.normal(0.0, aug.elastic_std, size=(2, n, n))
    rows, cols = np.meshgrid(np.linspace(0, n - 1, h), np.linspace(0, n - 1, w), indexing="ij")
    return np.stack([ndi.map_coordinates(c, [rows, cols], order=3, mode="nearest") for c in coarse])
