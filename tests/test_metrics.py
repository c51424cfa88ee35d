"""Metrics: losses, pixel error, V_rand / V_info against independent numpy code, tiled inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from torch import nn

from gradflow.em.data import synthetic_volume
from gradflow.em.metrics import (
    LOSSES,
    bce_loss,
    dice_loss,
    pixel_error,
    tiled_predict,
    v_info,
    v_rand,
)
from gradflow.errors import GradflowError

ISBI = Path(__file__).parents[1].parent / "shared" / "data" / "isbi2012"


# --- losses ----------------------------------------------------------------------------------


def test_dice_loss_matches_the_paper_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64) < 0.3).double()
    p = 1.0 / (1.0 + np.exp(-logits.detach().numpy()))
    y = target.numpy()
    expected = 1.0 - (2.0 * (y * p).sum() + 1.0) / (y.sum() + p.sum() + 1.0)
    loss = dice_loss(logits, target)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_dice_loss_is_near_zero_for_a_confident_match() -> None:
    target = (torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    assert dice_loss(40.0 * (2 * target - 1), target).item() < 1e-6
    assert dice_loss(-40.0 * (2 * target - 1), target).item() > 0.99


def test_bce_loss_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 5, 5, generator=gen, dtype=torch.float64)
    target = (torch.rand(3, 1, 5, 5, generator=gen, dtype=torch.float64) < 0.5).double()
    x, y = logits.numpy(), target.numpy()
    p = 1.0 / (1.0 + np.exp(-x))
    expected = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert bce_loss(logits, target).item() == pytest.approx(expected, abs=1e-12)


def test_losses_by_name() -> None:
    assert LOSSES.get("dice") is dice_loss and LOSSES.get("bce") is bce_loss
    with pytest.raises(GradflowError, match="dice"):
        LOSSES.get("dise")


# --- pixel error, V_rand, V_info ------------------------------------------------------------


def test_pixel_error_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    prob, label = rng.uniform(size=(2, 20, 30)), (rng.uniform(size=(2, 20, 30)) < 0.3)
    expected = np.count_nonzero((prob > 0.5) != label) / prob.size
    assert pixel_error(prob, label.astype(np.float32)) == pytest.approx(expected)
    assert pixel_error(label, label) == 0.0


def _reference_scores(prob: np.ndarray, label: np.ndarray) -> tuple[float, float, float]:
    """Independent numpy/scipy code after the challenge's Fiji scripts.

    Returns (Rand F-score counting pairs of distinct pixels, as skimage does; the same with
    the challenge's plain squares; the information-theoretic F-score).
    """
    truth, _ = ndi.label(label < 0.5)  # scipy's default structure is 4-connected in 2-D
    proposal, _ = ndi.label(prob <= 0.5)
    inside = truth > 0
    n = np.count_nonzero(inside)
    t, s = truth[inside], proposal[inside]
    singles = np.count_nonzero(s == 0)  # proposal membrane inside a cell: one segment each
    joint = np.unique(np.stack([t[s > 0], s[s > 0]]), axis=1, return_counts=True)[1]
    a = np.unique(t, return_counts=True)[1]
    b = np.unique(s[s > 0], return_counts=True)[1]

    sum_ab, sum_a, sum_b = (joint**2).sum() + singles, (a**2).sum(), (b**2).sum() + singles
    pairs = (sum_ab - n) / (0.5 * (sum_a - n) + 0.5 * (sum_b - n))
    squares = 2 * (sum_ab / sum_b) * (sum_ab / sum_a) / (sum_ab / sum_b + sum_ab / sum_a)

    def plogp(counts: np.ndarray) -> float:
        p = counts / n
        return float((p * np.log(p)).sum())

    single_term = -singles / n * np.log(n)  # each single pixel: (1/n) log(1/n)
    h_t = -plogp(a)
    h_s = -(plogp(b) + single_term)
    h_ts = -(plogp(joint) + single_term)
    mutual = h_t + h_s - h_ts
    precision, recall = mutual / h_t, mutual / h_s
    info = 2 * precision * recall / (precision + recall)
    return float(pairs), float(squares), float(info)


def _perturbations(label: np.ndarray) -> list[np.ndarray]:
    membrane = label > 0.5
    rng = np.random.default_rng(0)
    noisy = membrane ^ (rng.uniform(size=label.shape) < 0.02)
    return [
        ndi.binary_dilation(membrane, iterations=2),  # thicker membranes: cells shrink, split
        ndi.binary_erosion(membrane),  # thinner membranes: some cells merge
        noisy,  # salt and pepper
    ]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Two label slices: ISBI 2012 when present, else synthetic."""
    if ISBI.is_dir():
        files = [ISBI / "train" / "labels" / f"{i:02d}.png" for i in (0, 17)]
        return np.stack([np.asarray(Image.open(f)) == 0 for f in files]).astype(np.float32)
    return synthetic_volume(2, 256, seed=4).labels


def test_scores_are_one_for_identical_segmentations(labels: np.ndarray) -> None:
    assert v_rand(labels, labels) == pytest.approx(1.0, abs=1e-12)
    assert v_info(labels, labels) == pytest.approx(1.0, abs=1e-12)
    assert v_rand(labels[0], labels[0]) == pytest.approx(1.0, abs=1e-12)


def test_scores_match_independent_numpy_code(labels: np.ndarray) -> None:
    for label in labels:
        for prob in _perturbations(label):
            pairs, squares, info = _reference_scores(np.asarray(prob, dtype=float), label)
            # Same formula, different code: equal up to rounding.
            assert v_rand(prob, label) == pytest.approx(pairs, abs=1e-9)
            assert v_info(prob, label) == pytest.approx(info, abs=1e-9)
            # skimage counts distinct pixel pairs, the challenge plain squares: close on 512 px.
            assert v_rand(prob, label) == pytest.approx(squares, abs=1e-3)
            assert v_rand(prob, label) < 1.0 and v_info(prob, label) < 1.0


def test_stack_scores_average_the_slices(labels: np.ndarray) -> None:
    probs = np.stack([_perturbations(y)[0] for y in labels]).astype(np.float32)
    for score in (v_rand, v_info):
        per_slice = [score(p, y) for p, y in zip(probs, labels, strict=True)]
        assert score(probs, labels) == pytest.approx(np.mean(per_slice))


def _two_cells() -> np.ndarray:
    """A 20 x 21 label: two cells left and right of a membrane column, membrane frame."""
    label = np.ones((20, 21), dtype=np.float32)
    label[1:-1, 1:10] = 0.0
    label[1:-1, 11:-1] = 0.0
    return label


def test_a_split_cell_lowers_the_scores() -> None:
    truth = _two_cells()
    split = truth.copy()
    split[10, 1:10] = 1.0  # a membrane across the left cell
    assert v_rand(split, truth) < 0.95 and v_info(split, truth) < 0.95
    pairs, _, info = _reference_scores(split, truth)
    assert v_rand(split, truth) == pytest.approx(pairs) and v_info(split, truth) == pytest.approx(
        info
    )


def test_a_merge_lowers_the_scores() -> None:
    truth = _two_cells()
    merged = truth.copy()
    merged[5:8, 10] = 0.0  # a gap in the membrane joins the two cells
    assert v_rand(merged, truth) < 0.9 and v_info(merged, truth) < 0.9


def test_only_the_threshold_matters(labels: np.ndarray) -> None:
    soft = 0.4 + 0.2 * labels  # 0.4 in cells, 0.6 on membranes
    assert v_rand(soft, labels) == pytest.approx(1.0, abs=1e-12)
    assert v_info(soft, labels) == pytest.approx(1.0, abs=1e-12)
    assert pixel_error(soft, labels) == 0.0
    assert v_rand(soft, labels, threshold=0.7) < 0.5  # no membrane predicted: all cells merge


def test_extra_membrane_inside_a_cell_splits_rather_than_merges() -> None:
    truth = _two_cells()
    all_membrane = np.ones_like(truth)  # each cell pixel its own segment: nothing merged
    n = np.count_nonzero(truth == 0)
    assert v_rand(all_membrane, truth) == pytest.approx(0.0)
    # H(T) = 1 bit (two equal cells), H(S) = log2 n, I(S;T) = H(T): 2 / (1 + log2 n).
    assert v_info(all_membrane, truth) == pytest.approx(2 / (1 + np.log2(n)))


def test_no_cells_is_undefined() -> None:
    label = np.ones((8, 8), dtype=np.float32)
    assert np.isnan(v_rand(label, label)) and np.isnan(v_info(label, label))


# --- tiled inference ---------------------------------------------------------------------------


def _conv_model() -> nn.Module:
    """Two 3x3 convolutions (receptive field reaches 2 px), zero padding at the borders."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 1, 3, padding=1)
    )


def _direct(model: nn.Module, image: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(image)[None, None]))[0, 0].numpy()


@pytest.mark.parametrize(("shape", "tile", "overlap"), [((512, 512), 128, 16), ((200, 300), 64, 8)])
def test_tiled_equals_whole_slice_prediction(
    shape: tuple[int, int], tile: int, overlap: int
) -> None:
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    model = _conv_model()
    whole = tiled_predict(model, image, tile=max(shape), overlap=0)
    tiled = tiled_predict(model, image, tile=tile, overlap=overlap, batch_size=3)
    assert tiled.shape == shape and tiled.dtype == np.float32
    # Float32 convolutions of different input sizes may sum in another order: 1e-5.
    np.testing.assert_allclose(tiled, _direct(model, image), atol=1e-5)
    if shape[0] == shape[1]:
        np.testing.assert_allclose(whole, _direct(model, image), atol=1e-5)


def test_too_little_overlap_shows_at_the_seams() -> None:
    image = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    model = _conv_model()
    coarse = tiled_predict(model, image, tile=64, overlap=0)
    assert np.abs(coarse - _direct(model, image)).max() > 1e-3


def test_slice_smaller_than_the_tile_is_reflect_padded() -> None:
    image = np.random.default_rng(2).standard_normal((100, 90)).astype(np.float32)
    pointwise = nn.Conv2d(1, 1, 1)
    out = tiled_predict(pointwise, image, tile=128, overlap=32)
    assert out.shape == (100, 90)
    np.testing.assert_allclose(out, _direct(pointwise, image), atol=1e-6)


def test_train_eval_modes_are_restored() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    model = _conv_model()
    model.train()
    model[2].eval()  # a submodule deliberately left in eval mode
    with torch.no_grad():
        a = tiled_predict(model, image, tile=32, overlap=8)
    b = tiled_predict(model, image, tile=32, overlap=8)
    np.testing.assert_array_equal(a, b)  # dropout was off inside: eval mode
    assert model.training and model[0].training and not model[2].training
    model.eval()
    tiled_predict(model, image, tile=32, overlap=8)
    assert not any(m.training for m in model.modules())


def test_bad_tiles_and_models() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    with pytest.raises(GradflowError, match="overlap"):
        tiled_predict(nn.Conv2d(1, 1, 1), image, tile=32, overlap=32)
    with pytest.raises(GradflowError, match="same shape"):
        tiled_predict(nn.Conv2d(1, 1, 3), image, tile=32, overlap=8)
