"""Load the ISBI 2012 EM training slices from a folder of PNGs or the challenge's TIFF stacks."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from gradflow.em.data.volume import EMVolume, standardise
from gradflow.errors import GradflowError

_TIFF_IMAGES, _TIFF_LABELS = "train-volume.tif", "train-labels.tif"
_EXPECTED = (
    "expected train/images/ and train/labels/ with one PNG per slice, images/ and labels/, "
    f"or the challenge's {_TIFF_IMAGES} and {_TIFF_LABELS}"
)


def load_isbi(path: str | Path) -> EMVolume:
    """The labelled ISBI 2012 training slices found in the folder ``path``.

    Accepted layouts, tried in this order:

    - ``train/images/NN.png`` + ``train/labels/NN.png`` (the shared copy's layout; a
      ``test/`` folder beside ``train/`` is ignored: its labels are private),
    - ``images/NN.png`` + ``labels/NN.png``,
    - the challenge's multi-page ``train-volume.tif`` + ``train-labels.tif``.

    Labels are 255 (or any one nonzero value) = cell interior, 0 = membrane; the returned
    labels are membrane = 1. Images are standardised per slice. Any problem with the files
    raises one :class:`GradflowError` that names the path.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise GradflowError(f"data folder not found: {root}")
    if not root.is_dir():
        raise GradflowError(f"data path is not a folder: {root} ({_EXPECTED})")
    if not _visible(root.iterdir()):
        raise GradflowError(f"data folder is empty: {root} ({_EXPECTED})")
    for folder in (root / "train", root):
        if (folder / "images").is_dir():
            images, labels = _read_png_folders(folder / "images", folder / "labels")
            where = f"ISBI 2012 PNG slices in {folder}"
            break
    else:
        if not (root / _TIFF_IMAGES).is_file():
            raise GradflowError(f"no ISBI 2012 images in {root}: {_EXPECTED}")
        images, labels = _read_tiff_pair(root / _TIFF_IMAGES, root / _TIFF_LABELS)
        where = f"ISBI 2012 TIFF stacks in {root}"
    n, h, w = images.shape
    return EMVolume(standardise(images), labels, f"{where} ({n} slices {h}x{w})")


def _visible(paths: Iterable[Path]) -> list[Path]:
    """The paths that are not hidden (no leading dot)."""
    return [p for p in paths if not p.name.startswith(".")]


def _natural_key(path: Path) -> list[int | str]:
    """Sort key under which ``2.png`` comes before ``10.png``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _files(folder: Path) -> list[Path]:
    return sorted((p for p in _visible(folder.iterdir()) if p.is_file()), key=_natural_key)


def _decode_all(files: list[Path]) -> list[np.ndarray]:
    """Each file as a 2-D array; files that do not decode are named together in one error."""
    arrays, bad = [], []
    for f in files:
        try:
            with Image.open(f) as img:
                gray = img if img.mode in ("L", "I;16", "I", "F", "1") else img.convert("L")
                arrays.append(np.asarray(gray))
        # Decoders raise many exception types for a non-image; any of them means "not an image".
        except Exception:
            bad.append(str(f))
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise GradflowError(f"cannot read as images: {shown}")
    return arrays


def _read_png_folders(image_dir: Path, label_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    image_files = _files(image_dir)
    if not image_files:
        raise GradflowError(f"no images in {image_dir} (empty folder)")
    images = _decode_all(image_files)
    shape = images[0].shape
    for f, img in zip(image_files, images, strict=True):
        if img.shape != shape:
            raise GradflowError(
                f"{f} is {_size(img.shape)} but {image_files[0]} is {_size(shape)}; "
                "all slices must have one size"
            )
    if not label_dir.is_dir():
        raise GradflowError(f"labels folder missing: {label_dir} (needed beside {image_dir})")
    label_files = _files(label_dir)
    decoded = _decode_all(label_files)
    label_by_stem = {p.stem: (p, lab) for p, lab in zip(label_files, decoded, strict=True)}
    missing = [p.name for p in image_files if p.stem not in label_by_stem]
    if missing or len(label_files) != len(image_files):
        detail = f"; no label for {', '.join(missing[:5])}" if missing else ""
        raise GradflowError(
            f"{len(image_files)} images in {image_dir} but {len(label_files)} labels "
            f"in {label_dir}{detail}"
        )
    membranes = []
    for f in image_files:
        label_file, label = label_by_stem[f.stem]
        if label.shape != shape:
            raise GradflowError(
                f"label {label_file} is {_size(label.shape)}, its image {_size(shape)}"
            )
        membranes.append(_membrane(label, label_file))
    return np.stack(images), np.stack(membranes)


def _read_tiff_pair(image_file: Path, label_file: Path) -> tuple[np.ndarray, np.ndarray]:
    if not label_file.is_file():
        raise GradflowError(f"labels missing: {label_file} (needed beside {image_file})")
    images, labels = _read_stack(image_file), _read_stack(label_file)
    if images.shape != labels.shape:
        raise GradflowError(
            f"{image_file} holds {len(images)} slices of {_size(images.shape[1:])} but "
            f"{label_file} holds {len(labels)} slices of {_size(labels.shape[1:])}"
        )
    return images, np.stack([_membrane(lab, label_file) for lab in labels])


def _read_stack(file: Path) -> np.ndarray:
    """A multi-page grayscale TIFF as ``[N, H, W]``."""
    try:
        with tifffile.TiffFile(file) as tif:
            series = tif.series[0]
            stack, axes = np.asarray(series.asarray()), series.axes
    # As in _decode_all: whatever the decoder raises, the file is not a readable TIFF.
    except Exception:
        raise GradflowError(f"cannot read as a TIFF stack: {file}") from None
    if stack.ndim == 2:
        stack = stack[None]
    if "S" in axes or stack.ndim != 3 or 0 in stack.shape:
        raise GradflowError(
            f"{file}: expected grayscale pages, got an array of {stack.shape} (axes {axes})"
        )
    return stack


def _membrane(label: np.ndarray, file: Path) -> np.ndarray:
    """Membrane = 1 where the label is 0; the label must hold at most one other value."""
    interior = label != 0
    if interior.any() and np.any(label[interior] != label[interior].flat[0]):
        raise GradflowError(
            f"{file}: labels must be binary (0 = membrane, 255 = cell interior), "
            f"found values {np.unique(label)[:6].tolist()}"
        )
    return (~interior).astype(np.float32)


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)
