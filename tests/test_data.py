"""Data: ISBI 2012 loading (PNG and TIFF), synthetic data, augmentation, batches, bad input."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage as ndi

from gradflow.em.data import (
    Augmentation,
    EMVolume,
    augment_pair,
    cache_dir,
    epoch_batches,
    load_dataset,
    load_isbi,
    split,
    steps_per_epoch,
    synthetic_volume,
)
from gradflow.errors import GradflowError

ISBI = Path(__file__).parents[1].parent / "shared" / "data" / "isbi2012"


@pytest.fixture(scope="module")
def isbi() -> EMVolume:
    if not ISBI.is_dir():
        pytest.skip(f"ISBI 2012 data not found at {ISBI}; see data/README.md")
    return load_isbi(ISBI)


@pytest.fixture(scope="module")
def small() -> EMVolume:
    return synthetic_volume(6, 96, seed=3)


def _slices(n: int = 3, h: int = 32, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images and 0/255 labels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    labels = np.where(rng.uniform(size=(n, h, w)) < 0.2, 0, 255).astype(np.uint8)
    return images, labels


def _write_tiff(path: Path, stack: np.ndarray) -> None:
    """A multi-page grayscale TIFF, as the challenge ships (never read as RGB planes)."""
    tifffile.imwrite(path, stack, photometric="minisblack")


def _write_pngs(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for sub, stack in (("images", images), ("labels", labels)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(stack):
            Image.fromarray(a).save(root / sub / f"{i:02d}.png")


# --- ISBI 2012 ----------------------------------------------------------------------------


def test_isbi_pngs_load(isbi: EMVolume) -> None:
    assert isbi.images.shape == isbi.labels.shape == (30, 512, 512)
    assert isbi.images.dtype == isbi.labels.dtype == np.float32
    assert set(np.unique(isbi.labels)) == {0.0, 1.0}
    fraction = isbi.labels.mean(axis=(1, 2))
    assert 0.17 <= fraction.mean() <= 0.27
    assert np.all((fraction > 0.15) & (fraction < 0.3))
    np.testing.assert_allclose(isbi.images.mean(axis=(1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(isbi.images.std(axis=(1, 2)), 1.0, atol=1e-4)
    raw = np.asarray(Image.open(ISBI / "train" / "labels" / "07.png"))
    np.testing.assert_array_equal(isbi.labels[7], raw == 0)
    assert str(ISBI / "train") in isbi.source


def test_isbi_loads_quickly_through_load_dataset(isbi: EMVolume) -> None:
    start = time.perf_counter()
    again = load_dataset(ISBI)
    assert time.perf_counter() - start < 10.0  # typically 0.2-0.4 s; generous for shared CPUs
    np.testing.assert_array_equal(again.labels, isbi.labels)


def test_tiff_stacks_load_like_pngs(tmp_path: Path) -> None:
    images, labels = _slices()
    (tmp_path / "tif").mkdir()
    _write_tiff(tmp_path / "tif" / "train-volume.tif", images)
    _write_tiff(tmp_path / "tif" / "train-labels.tif", labels)
    _write_tiff(tmp_path / "tif" / "test-volume.tif", images)  # tolerated, unused
    _write_pngs(tmp_path / "png", images, labels)
    tif, png = load_isbi(tmp_path / "tif"), load_isbi(tmp_path / "png")
    assert tif.images.shape == (3, 32, 40)
    np.testing.assert_array_equal(tif.labels, labels == 0)
    np.testing.assert_array_equal(tif.images, png.images)
    np.testing.assert_array_equal(tif.labels, png.labels)
    np.testing.assert_allclose(tif.images.std(axis=(1, 2)), 1.0, atol=1e-5)
    assert "TIFF" in tif.source and "PNG" in png.source


def test_single_page_tiff_is_one_slice(tmp_path: Path) -> None:
    images, labels = _slices(n=1)
    _write_tiff(tmp_path / "train-volume.tif", images[0])
    _write_tiff(tmp_path / "train-labels.tif", labels[0])
    assert len(load_isbi(tmp_path)) == 1


def test_pngs_sort_naturally(tmp_path: Path) -> None:
    images, labels = _slices(n=11)
    for sub, stack in (("images", images), ("labels", labels)):
        (tmp_path / sub).mkdir()
        for i, a in enumerate(stack):
            Image.fromarray(a).save(tmp_path / sub / f"{i}.png")
    vol = load_isbi(tmp_path)
    np.testing.assert_array_equal(vol.labels, labels == 0)


# --- bad data: one GradflowError naming the path --------------------------------------------


def _raises(path: Path, *needles: str) -> None:
    with pytest.raises(GradflowError) as err:
        load_dataset(path)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message


def test_missing_folder(tmp_path: Path) -> None:
    _raises(tmp_path / "nowhere", "not found", str(tmp_path / "nowhere"))


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    _raises(tmp_path / "x.png", "not a folder", str(tmp_path / "x.png"))


def test_empty_folder(tmp_path: Path) -> None:
    _raises(tmp_path, "empty", str(tmp_path))


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    _raises(tmp_path, "no ISBI 2012 images", str(tmp_path), "train-volume.tif")


def test_empty_images_folder(tmp_path: Path) -> None:
    (tmp_path / "train" / "images").mkdir(parents=True)
    _raises(tmp_path, "no images", str(tmp_path / "train" / "images"))


def test_labels_folder_missing(tmp_path: Path) -> None:
    images, labels = _slices()
    _write_pngs(tmp_path, images, labels)
    for f in (tmp_path / "labels").iterdir():
        f.unlink()
    (tmp_path / "labels").rmdir()
    _raises(tmp_path, "labels folder missing", str(tmp_path / "labels"))


def test_label_count_differs(tmp_path: Path) -> None:
    images, labels = _slices()
    _write_pngs(tmp_path, images, labels)
    (tmp_path / "labels" / "01.png").unlink()
    _raises(tmp_path, "3 images", "2 labels", "01.png", str(tmp_path / "labels"))


def test_label_size_differs(tmp_path: Path) -> None:
    images, labels = _slices()
    _write_pngs(tmp_path, images, labels)
    Image.fromarray(labels[2, :16]).save(tmp_path / "labels" / "02.png")
    _raises(tmp_path, str(tmp_path / "labels" / "02.png"), "16x40", "32x40")


def test_image_sizes_differ(tmp_path: Path) -> None:
    images, labels = _slices()
    _write_pngs(tmp_path, images, labels)
    Image.fromarray(images[1, :, :20]).save(tmp_path / "images" / "01.png")
    _raises(tmp_path, str(tmp_path / "images" / "01.png"), "32x20", "32x40")


def test_non_image_files_are_named(tmp_path: Path) -> None:
    images, labels = _slices()
    _write_pngs(tmp_path, images, labels)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "03.png").write_bytes(b"\x89PNG broken")
    _raises(tmp_path, "cannot read", str(tmp_path / "images" / "notes.txt"), "03.png")


def test_non_binary_labels(tmp_path: Path) -> None:
    images, labels = _slices()
    labels[1, 0, :3] = (0, 128, 255)
    _write_pngs(tmp_path, images, labels)
    _raises(tmp_path, "binary", str(tmp_path / "labels" / "01.png"))


def test_tiff_labels_missing(tmp_path: Path) -> None:
    _write_tiff(tmp_path / "train-volume.tif", _slices()[0])
    _raises(tmp_path, "labels missing", str(tmp_path / "train-labels.tif"))


def test_colour_tiff_is_refused(tmp_path: Path) -> None:
    images, labels = _slices()
    tifffile.imwrite(tmp_path / "train-volume.tif", np.stack([images[0]] * 3, axis=-1))
    _write_tiff(tmp_path / "train-labels.tif", labels)
    _raises(tmp_path, "grayscale", str(tmp_path / "train-volume.tif"))


def test_tiff_not_decodable(tmp_path: Path) -> None:
    (tmp_path / "train-volume.tif").write_bytes(b"not a tiff at all")
    _write_tiff(tmp_path / "train-labels.tif", _slices()[1])
    _raises(tmp_path, "cannot read", str(tmp_path / "train-volume.tif"))


def test_tiff_page_counts_differ(tmp_path: Path) -> None:
    images, labels = _slices()
    _write_tiff(tmp_path / "train-volume.tif", images)
    _write_tiff(tmp_path / "train-labels.tif", labels[:2])
    _raises(tmp_path, "3 slices", "2 slices", str(tmp_path / "train-labels.tif"))


def test_crop_larger_than_images(small: EMVolume) -> None:
    with pytest.raises(GradflowError, match=r"200x200.*96x96"):
        epoch_batches(small, crop=200, batch_size=2, steps=1, seed=0, epoch=0)


def test_batch_must_split_over_ranks(small: EMVolume) -> None:
    with pytest.raises(GradflowError, match="3 ranks"):
        epoch_batches(small, crop=32, batch_size=4, steps=1, seed=0, epoch=0, world_size=3)


# --- synthetic data and split ------------------------------------------------------------------


def test_synthetic_is_the_default_and_deterministic() -> None:
    a = load_dataset(None, seed=5, n_synthetic=3, synthetic_size=128)
    b = load_dataset("synthetic", seed=5, n_synthetic=3, synthetic_size=128)
    c = load_dataset(None, seed=6, n_synthetic=3, synthetic_size=128)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert not np.allclose(a.images, c.images)
    two = synthetic_volume(2, 128, seed=5)  # slice i depends on (seed, i) only
    np.testing.assert_array_equal(two.labels, a.labels[:2])
    assert "synthetic" in a.source and "seed 5" in a.source


def test_synthetic_labels_and_speed() -> None:
    start = time.perf_counter()
    vol = synthetic_volume(3, 512, seed=0)
    per_slice = (time.perf_counter() - start) / 3
    assert per_slice < 2.0  # typically ~0.12 s
    assert vol.images.shape == vol.labels.shape == (3, 512, 512)
    assert vol.labels.dtype == vol.images.dtype == np.float32
    assert set(np.unique(vol.labels)) == {0.0, 1.0}
    assert np.all((vol.labels.mean(axis=(1, 2)) > 0.12) & (vol.labels.mean(axis=(1, 2)) < 0.32))
    np.testing.assert_allclose(vol.images.mean(axis=(1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(vol.images.std(axis=(1, 2)), 1.0, atol=1e-4)
    # Membranes are dark in the image, as in EM.
    assert vol.images[vol.labels == 1].mean() < vol.images[vol.labels == 0].mean() - 1.0


def test_split_holds_out_the_last_slices(small: EMVolume) -> None:
    train, val = split(small, n_val=2)
    assert len(train) == 4 and len(val) == 2
    np.testing.assert_array_equal(val.images, small.images[4:])
    np.testing.assert_array_equal(train.labels, small.labels[:4])
    assert "slices 4-5" in val.source
    with pytest.raises(GradflowError, match="6 slices"):
        split(small, n_val=6)


def test_default_split_is_25_5(isbi: EMVolume) -> None:
    train, val = split(isbi)
    assert (len(train), len(val)) == (25, 5)
    np.testing.assert_array_equal(val.labels, isbi.labels[25:])


# --- augmentation --------------------------------------------------------------------------


def _smooth_pair(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    field = ndi.gaussian_filter(np.random.default_rng(1).standard_normal((size, size)), 4.0)
    image = (field / field.std()).astype(np.float32)
    return image, (image > 0).astype(np.float32)


def _near_edge(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds both label values."""
    return ndi.maximum_filter(label, 3) != ndi.minimum_filter(label, 3)


@pytest.mark.parametrize("elastic", [0.0, 4.0])
@pytest.mark.parametrize("crop", [None, 48])
def test_augmentation_keeps_image_and_label_aligned(elastic: float, crop: int | None) -> None:
    image, label = _smooth_pair()
    aug = Augmentation(elastic_std=elastic)
    for seed in range(6):
        new_image, new_label = augment_pair(
            image, label, np.random.default_rng(seed), aug, crop=crop
        )
        assert new_image.shape == new_label.shape == ((96, 96) if crop is None else (crop, crop))
        assert set(np.unique(new_label)) <= {0.0, 1.0}
        mismatch = (new_image > 0) != (new_label > 0.5)
        # Bilinear image and nearest-neighbour label may disagree only next to a label edge;
        # on the window's outer ring that edge may lie just outside the window.
        assert not np.any((mismatch & ~_near_edge(new_label))[1:-1, 1:-1])
        assert mismatch.mean() < 0.03


def test_augmentation_is_deterministic_and_varies() -> None:
    image, label = _smooth_pair()
    a = augment_pair(image, label, np.random.default_rng(7), crop=48)
    b = augment_pair(image, label, np.random.default_rng(7), crop=48)
    c = augment_pair(image, label, np.random.default_rng(8), crop=48)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_identity_and_flips_are_exact() -> None:
    image, label = _smooth_pair()
    still = Augmentation(flips=False, max_rotation_deg=0.0, max_shear_deg=0.0)
    new_image, new_label = augment_pair(image, label, np.random.default_rng(0), still)
    np.testing.assert_array_equal(new_image, image)
    np.testing.assert_array_equal(new_label, label)
    flips = Augmentation(max_rotation_deg=0.0, max_shear_deg=0.0)
    candidates = [image, image[::-1], image[:, ::-1], image[::-1, ::-1]]
    for seed in range(4):
        new_image, _ = augment_pair(image, label, np.random.default_rng(seed), flips)
        assert any(np.array_equal(new_image, c) for c in candidates)


# --- batches -------------------------------------------------------------------------------


def test_batches_have_the_crop_shape(small: EMVolume) -> None:
    batches = list(epoch_batches(small, crop=40, batch_size=3, steps=4, seed=0, epoch=0))
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == y.shape == (3, 1, 40, 40)
        assert x.dtype == y.dtype == torch.float32
        assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    plain = next(
        epoch_batches(small, crop=40, batch_size=2, steps=1, seed=0, epoch=0, augment=False)
    )
    assert plain[0].shape == (2, 1, 40, 40)


def test_epoch_stream_reproduces(small: EMVolume) -> None:
    def run(epoch: int, steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(epoch_batches(small, crop=32, batch_size=4, steps=steps, seed=1, epoch=epoch))

    first, again, other, longer = run(2), run(2), run(3), run(2, steps=5)
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, again, longer, strict=False):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1, x3) and torch.equal(y1, y3)
    assert not torch.equal(first[0][0], other[0][0])


def test_epoch_visits_slices_evenly(small: EMVolume) -> None:
    # Crops equal to the whole slice, no augmentation: each batch sample is a whole slice.
    stream = epoch_batches(small, crop=96, batch_size=3, steps=2, seed=0, epoch=4, augment=False)
    seen = [
        next(i for i, im in enumerate(small.images) if np.array_equal(sample[0].numpy(), im))
        for x, _ in stream
        for sample in x
    ]
    assert sorted(seen) == list(range(6))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_union_is_the_global_batch(small: EMVolume, world_size: int) -> None:
    kwargs = {"crop": 32, "batch_size": 4, "steps": 2, "seed": 9, "epoch": 1}
    single = list(epoch_batches(small, **kwargs))
    shards = [
        list(epoch_batches(small, **kwargs, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([s[step][0] for s in shards]), x)
        assert torch.equal(torch.cat([s[step][1] for s in shards]), y)


def test_steps_per_epoch(small: EMVolume) -> None:
    assert steps_per_epoch(small, crop=96, batch_size=4) == 2  # 6 whole slices, batch 4
    assert steps_per_epoch(small, crop=48, batch_size=4) == 6


# --- the synthetic volume cache -----------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(folder))
    return folder


def _build(heard: list[str]) -> EMVolume:
    return load_dataset("synthetic", seed=2, n_synthetic=2, synthetic_size=64, say=heard.append)


def _same(a: EMVolume, b: EMVolume) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.images.dtype == a.labels.dtype == np.float32
    assert a.source == b.source


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRADFLOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "gradflow"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "gradflow"
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_second_build_loads_the_cache_exactly(cache: Path) -> None:
    heard: list[str] = []
    first = _build(heard)
    second = _build(heard)
    assert heard[0].startswith("building the synthetic EM volume (seed 2, 2 x 64 px)")
    assert heard[1].startswith("loading the synthetic EM volume") and str(cache) in heard[1]
    _same(first, second)
    _same(second, synthetic_volume(2, 64, seed=2))
    assert [p.suffix for p in cache.iterdir()] == [".npz"]  # no temporary file left behind


def _rewrite(path: Path, **changes: object) -> None:
    with np.load(path) as entry:
        arrays = {k: entry[k] for k in entry.files}
    np.savez(path, **{**arrays, **changes})


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not a zip", "flipped value", "wrong dtype", "wrong shape", "no checksum"],
)
def test_a_damaged_entry_is_rebuilt(cache: Path, damage: str) -> None:
    heard: list[str] = []
    good = _build(heard)
    (path,) = cache.iterdir()
    with np.load(path) as entry:
        images = entry["images"]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "not a zip":
        path.write_bytes(b"\x00" * 100)
    elif damage == "flipped value":
        images = images.copy()
        images[0, 5, 5] += 1.0
        _rewrite(path, images=images)
    elif damage == "wrong dtype":
        _rewrite(path, images=images.astype(np.float64))
    elif damage == "wrong shape":
        _rewrite(path, images=images[:1])
    else:
        with np.load(path) as entry:
            np.savez(path, images=entry["images"], labels=entry["labels"])
    again = _build(heard)
    assert "unusable" in heard[1] and heard[2].startswith("building")
    _same(again, good)
    assert _build(heard).images is not None and heard[-1].startswith("loading")  # repaired


def test_an_unwritable_cache_still_gives_the_volume(cache: Path) -> None:
    cache.write_text("a file where the folder should be")
    heard: list[str] = []
    volume = _build(heard)
    _same(volume, synthetic_volume(2, 64, seed=2))
    assert heard[-1].startswith("could not cache it")


def test_isbi_loading_is_announced(isbi: EMVolume) -> None:
    heard: list[str] = []
    load_dataset(ISBI, say=heard.append)
    assert heard == [f"loading ISBI 2012 from {ISBI}..."]
