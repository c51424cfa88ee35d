"""Losses, the ISBI 2012 challenge scores (pixel error, V_rand, V_info) and tiled inference.

Segmentations for V_rand / V_info are derived as in the challenge's evaluation (Fiji's
``trainableSegmentation.metrics``, Arganda-Carreras et al. 2015), at one fixed threshold:

- proposal: membrane where ``prob > threshold``; cells = 4-connected components of the
  other pixels (``skimage.measure.label(..., connectivity=1)``), membrane = 0;
- truth: likewise from the 0/1 membrane labels (membrane where ``label > 0.5``);
- foreground restriction: only pixels inside a true cell count (truth label > 0); proposal
  membrane pixels among them each count as a segment of their own (the challenge's
  ``p_i0`` term), so predicting a cell's pixels as membrane splits it rather than merging
  all membrane into one segment.

Not done: the challenge's "after border thinning" variants and its search for the best
threshold. Stacks ``[N, H, W]`` score each slice and average, as the challenge does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as connected_components
from skimage.metrics import adapted_rand_error, variation_of_information
from torch import nn

from gradflow.errors import GradflowError
from gradflow.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


@LOSSES.register("dice")
def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2*sum(y*p) + 1) / (sum(y) + sum(p) + 1)``, ``p = sigmoid(logits)``.

    Takes logits, not probabilities. The sums run over the whole batch at once (as the
    authors' Keras code, which flattens the batch), ``smooth`` = 1 as in the paper.
    """
    p = torch.sigmoid(logits)
    overlap = (p * target).sum()
    return 1.0 - (2.0 * overlap + smooth) / (p.sum() + target.sum() + smooth)


@LOSSES.register("bce")
def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over all pixels."""
    return F.binary_cross_entropy_with_logits(logits, target)


def pixel_error(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of pixels where ``prob > threshold`` disagrees with ``label > 0.5``."""
    return float(np.mean((np.asarray(prob) > threshold) != (np.asarray(label) > 0.5)))


def segments(membrane: np.ndarray) -> np.ndarray:
    """Cell ids 1..K of the 4-connected non-membrane regions of a 2-D mask; membrane = 0."""
    return np.asarray(connected_components(~membrane, background=0, connectivity=1))


def v_rand(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> float:
    """The challenge's foreground-restricted Rand F-score V_rand (1 is perfect).

    With the segmentations of the module docstring, ``1 - adapted_rand_error(truth,
    proposal, ignore_labels=(0,))[0]``: skimage's error is 1 minus the F-score (alpha = 0.5)
    of Rand precision and recall, i.e. ``sum n_ij^2 / (sum a_i^2 / 2 + sum b_j^2 / 2)`` with
    each sum of squares minus the pixel count (pairs of distinct pixels), over the contingency
    table ``n_ij`` of true cell ``i`` and proposal segment ``j``. The challenge's script
    counts pixel pairs with themselves (plain squares); on 512 x 512 ISBI slices the two
    differ by about 2e-5 (tested below 1e-3). Undefined (nan) for a slice with no true cell pixels.
    """
    return _per_slice(_v_rand, prob, label, threshold)


def v_info(prob: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> float:
    """The challenge's foreground-restricted information-theoretic score V_info (1 is perfect).

    With the segmentations of the module docstring, truth T and proposal S over the true
    cell pixels: ``(H(S|T), H(T|S)) = variation_of_information(truth, proposal,
    ignore_labels=(0,))`` from skimage, ``H(T)`` from the true cell sizes,
    ``I(S;T) = H(T) - H(T|S)``, ``H(S) = H(S|T) + I(S;T)`` and
    ``V_info = 2 I(S;T) / (H(S) + H(T))``: the F-score of the information precision
    ``I/H(T)`` and recall ``I/H(S)``. Where both entropies are 0 (one true cell, matched
    exactly) the score is 1; the challenge's script gives 0 there. nan for a slice with no
    true cell pixels.
    """
    return _per_slice(_v_info, prob, label, threshold)


def _per_slice(
    score: Callable[[np.ndarray, np.ndarray], float],
    prob: np.ndarray,
    label: np.ndarray,
    threshold: float,
) -> float:
    prob, label = np.asarray(prob), np.asarray(label)
    if prob.shape != label.shape or prob.ndim not in (2, 3):
        raise ValueError(f"prob {prob.shape} and label {label.shape} must be one [H,W] or [N,H,W]")
    if prob.ndim == 2:
        prob, label = prob[None], label[None]
    scores = []
    for p, y in zip(prob, label, strict=True):
        truth = segments(y > 0.5)
        scores.append(score(truth, _proposal(p > threshold, truth > 0)) if truth.any() else np.nan)
    return float(np.mean(scores))


def _proposal(membrane: np.ndarray, in_cells: np.ndarray) -> np.ndarray:
    """Proposal segments, with each membrane pixel inside a true cell a segment of its own."""
    proposal = segments(membrane)
    lonely = membrane & in_cells
    proposal[lonely] = proposal.max() + 1 + np.arange(np.count_nonzero(lonely))
    return proposal


def _v_rand(truth: np.ndarray, proposal: np.ndarray) -> float:
    # The unused precision or recall is 0/0 when every proposal segment is a single pixel.
    with np.errstate(invalid="ignore", divide="ignore"):
        error, _, _ = adapted_rand_error(truth, proposal, ignore_labels=(0,))
    return 1.0 - float(error)


def _v_info(truth: np.ndarray, proposal: np.ndarray) -> float:
    h_s_given_t, h_t_given_s = variation_of_information(truth, proposal, ignore_labels=(0,))
    sizes = np.bincount(truth.ravel())[1:]
    p_t = sizes[sizes > 0] / sizes.sum()
    h_t = float(-(p_t * np.log2(p_t)).sum())
    mutual = h_t - float(h_t_given_s)
    h_s = float(h_s_given_t) + mutual
    return 1.0 if h_s + h_t == 0 else 2.0 * mutual / (h_s + h_t)


def tiled_predict(
    model: nn.Module,
    image: np.ndarray,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
) -> np.ndarray:
    """Membrane probabilities ``[H, W]`` (float32) for one standardised slice, tile by tile.

    ``model`` maps ``[B, 1, h, w]`` to ``[B, 1, h, w]`` logits; tiles are ``tile`` x ``tile``
    (a size the model accepts) on a grid of stride ``tile - overlap``, the last row and
    column moved back to end at the slice edge. A slice smaller than a tile is reflect-padded
    up to the tile. Each tile's outputs within ``overlap // 2`` px of an edge that lies inside
    the slice are dropped, because there the model saw its own zero padding instead of the
    neighbouring pixels; the rest is averaged where tiles overlap. For a model whose
    receptive field reaches at most ``overlap // 2`` px, the result equals predicting the whole
    slice at once. Runs under ``torch.no_grad()`` in eval mode and puts every submodule back
    in the train/eval mode it had.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise GradflowError(f"tiles need 0 <= overlap < tile; got tile {tile}, overlap {overlap}")
    if image.ndim != 2:
        raise ValueError(f"expected one [H, W] slice, got shape {image.shape}")
    h, w = image.shape
    pad_h, pad_w = max(tile - h, 0), max(tile - w, 0)
    padded = np.pad(image, ((0, pad_h), (0, pad_w)), mode="reflect") if pad_h or pad_w else image
    ph, pw = padded.shape
    margin = overlap // 2
    windows = [(r, c) for r in _starts(ph, tile, overlap) for c in _starts(pw, tile, overlap)]

    weight = np.ones((tile, tile), dtype=np.float32)
    total = np.zeros((ph, pw), dtype=np.float32)
    count = np.zeros((ph, pw), dtype=np.float32)
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                chunk = windows[i : i + batch_size]
                x = np.stack([padded[r : r + tile, c : c + tile] for r, c in chunk])
                batch = torch.from_numpy(np.ascontiguousarray(x[:, None], dtype=np.float32))
                out = model(batch.to(device))
                if tuple(out.shape) != tuple(batch.shape):
                    raise GradflowError(
                        f"tiled prediction needs a model mapping {tuple(batch.shape)} to the same "
                        f"shape; it returned {tuple(out.shape)}"
                    )
                probs = torch.sigmoid(out).float().cpu().numpy()[:, 0]
                for (r, c), p in zip(chunk, probs, strict=True):
                    weight[:] = 1.0
                    if r > 0:
                        weight[:margin] = 0.0
                    if r + tile < ph:
                        weight[tile - margin :] = 0.0
                    if c > 0:
                        weight[:, :margin] = 0.0
                    if c + tile < pw:
                        weight[:, tile - margin :] = 0.0
                    total[r : r + tile, c : c + tile] += weight * p
                    count[r : r + tile, c : c + tile] += weight
    finally:
        for module, training in modes.items():
            module.training = training
    return (total / count)[:h, :w]


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: stride ``tile - overlap``, the last one flush with the end."""
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts
