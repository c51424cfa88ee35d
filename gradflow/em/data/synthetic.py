"""A built-in EM-like data set with exact membrane labels, generated from a seed."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from gradflow.em.data.volume import EMVolume, standardise
from gradflow.errors import GradflowError

# Part of the cache key of built volumes (gradflow.em.data.cache): raise it whenever a change
# here changes the generated slices.
GENERATOR_VERSION = 1
# Cells per 512 x 512 slice: ISBI 2012 slices hold about 100-200 cell profiles.
_CELLS_PER_SLICE = (100, 180)


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """A smooth random field of unit std with features about ``scale`` pixels wide.

    Noise on a coarse grid, upsampled by a cubic spline applied separably as two small
    matrix products, which is far cheaper than filtering or interpolating at full resolution.
    """
    coarse = max(4, round(size / scale) + 3)
    noise = ndi.gaussian_filter(rng.standard_normal((coarse, coarse)), 1.0, mode="wrap")
    grid = np.linspace(1.0, coarse - 2.0, size)
    upsample = np.stack([ndi.map_coordinates(e, [grid], order=3) for e in np.eye(coarse)], 1)
    field = upsample @ noise @ upsample.T
    return (field - field.mean()) / (field.std() + 1e-12)


def _cell_seeds(rng: np.random.Generator, size: int) -> np.ndarray:
    """Seed points, denser in some regions so that cell sizes vary as in EM."""
    area = (size / 512) ** 2
    n = max(4, round(rng.integers(*_CELLS_PER_SLICE) * area))
    density = np.exp(0.8 * _smooth_field(rng, size, 160.0))
    density /= density.max()
    seeds: list[np.ndarray] = []
    while sum(len(s) for s in seeds) < n:
        cand = rng.uniform(0, size - 1, (4 * n, 2))
        keep = rng.uniform(size=len(cand)) < density[cand[:, 0].astype(int), cand[:, 1].astype(int)]
        seeds.append(cand[keep])
    return np.concatenate(seeds)[:n]


def _cells(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cell ids from a Voronoi tessellation of warped space, so boundaries curve."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    for scale, amp in ((48.0, rng.uniform(10.0, 18.0)), (16.0, rng.uniform(2.0, 4.0))):
        rows += amp * _smooth_field(rng, size, scale)
        cols += amp * _smooth_field(rng, size, scale)
    _, ids = cKDTree(_cell_seeds(rng, size)).query(np.stack([rows.ravel(), cols.ravel()], 1))
    return np.asarray(ids, dtype=np.int32).reshape(size, size)


def _boundary_distance(cells: np.ndarray) -> np.ndarray:
    """Distance of each pixel to the nearest boundary between two cells."""
    edge = np.zeros(cells.shape, dtype=bool)
    edge[:-1] |= cells[:-1] != cells[1:]
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    return np.asarray(ndi.distance_transform_edt(~edge))


def _blobs(
    rng: np.random.Generator, size: int, allowed: np.ndarray, count: int, radii: tuple[float, float]
) -> np.ndarray:
    """A mask of up to ``count`` random ellipses centred on ``allowed`` pixels."""
    mask = np.zeros((size, size), dtype=bool)
    candidates = np.flatnonzero(allowed)
    for flat in rng.choice(candidates, size=min(count, candidates.size), replace=False):
        r0, c0 = divmod(int(flat), size)
        a, b = sorted(rng.uniform(*radii, size=2), reverse=True)
        theta = rng.uniform(0, np.pi)
        reach = int(np.ceil(a)) + 1
        rs = slice(max(r0 - reach, 0), min(r0 + reach + 1, size))
        cs = slice(max(c0 - reach, 0), min(c0 + reach + 1, size))
        dr, dc = np.ogrid[rs, cs]
        dr, dc = dr - r0, dc - c0
        u = dr * np.cos(theta) + dc * np.sin(theta)
        v = -dr * np.sin(theta) + dc * np.cos(theta)
        mask[rs, cs] |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return mask


def synthetic_slice(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """One EM-like slice: ``(image, label)``, image float64 in about [0, 1], label membrane = 1.

    Cells are a Voronoi tessellation of randomly warped space; membranes are the cell
    boundaries widened by a smoothly varying half-width (1.3-4.5 px), plus dark blobs at
    some junctions. The image adds per-cell brightness, mitochondria-like dark ellipses and
    vesicle-like dots inside cells (both labelled interior, as in ISBI), texture, blur and noise.
    """
    cells = _cells(rng, size)
    dist = _boundary_distance(cells)
    half_width = np.clip(2.5 + 0.8 * _smooth_field(rng, size, 64.0), 1.3, 4.5)
    on_edge = dist < 0.5
    junction_mask = _blobs(rng, size, on_edge, int(rng.integers(3, 10)), (2.5, 6.0))
    membrane = (dist < half_width) | junction_mask

    levels = rng.uniform(0.55, 0.85, cells.max() + 1)
    image = levels[cells] + 0.06 * _smooth_field(rng, size, 24.0)
    deep_inside = dist > half_width + 16.0
    mito_mask = _blobs(rng, size, deep_inside, int(rng.integers(3, 10)), (6.0, 14.0))
    stripes = 0.5 + 0.5 * np.sin(np.arange(size)[:, None] * 0.9 + np.arange(size)[None, :] * 0.6)
    image = np.where(mito_mask, 0.4 + 0.1 * stripes, image)
    # a darker rim, like the double membrane of a mitochondrion
    image[mito_mask & ~ndi.binary_erosion(mito_mask, iterations=2)] = 0.3
    vesicles = np.zeros((size, size))
    inside = np.flatnonzero((dist > half_width + 3.0).ravel() & ~mito_mask.ravel())
    n_ves = min(int(rng.integers(300, 700) * (size / 512) ** 2), inside.size)
    vesicles.ravel()[rng.choice(inside, size=n_ves, replace=False)] = 1.0
    image -= 0.3 * np.clip(ndi.gaussian_filter(vesicles, 1.2) * 10.0, 0.0, 1.0)

    soft_membrane = np.clip(half_width + 0.5 - dist, 0.0, 1.0)
    soft_membrane = np.maximum(soft_membrane, junction_mask)
    dark = rng.uniform(0.12, 0.3) + 0.05 * _smooth_field(rng, size, 32.0)
    image = image * (1.0 - soft_membrane) + dark * soft_membrane
    image += 0.2 * ndi.gaussian_filter(rng.standard_normal((size, size)), 1.5)
    image = ndi.gaussian_filter(image, rng.uniform(0.7, 1.3))
    image += rng.uniform(0.02, 0.05) * rng.standard_normal((size, size))
    return image, membrane.astype(np.float32)


def synthetic_volume(n: int = 30, size: int = 512, seed: int = 0) -> EMVolume:
    """``n`` synthetic slices of ``size`` x ``size``; slice ``i`` depends only on ``(seed, i)``.

    Nothing is downloaded; :func:`gradflow.em.data.load_dataset` caches built volumes
    (:mod:`gradflow.em.data.cache`).
    """
    if n < 1 or size < 16:
        raise GradflowError(f"synthetic data needs at least 1 slice of 16 px; got {n} of {size} px")
    if seed < 0:
        raise GradflowError(f"synthetic data seed must be >= 0, got {seed}")
    pairs = [synthetic_slice(np.random.default_rng([seed, i]), size) for i in range(n)]
    images = standardise(np.stack([p[0] for p in pairs]))
    labels = np.stack([p[1] for p in pairs])
    return EMVolume(images, labels, synthetic_source(n, size, seed))


def synthetic_source(n: int, size: int, seed: int) -> str:
    """The one-line description of a synthetic volume."""
    return f"synthetic EM (seed {seed}, {n} slices {size}x{size})"
