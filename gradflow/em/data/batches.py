"""Deterministic per-epoch streams of training crops, shardable across DDP ranks."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from gradflow.em.data.augment import Augmentation, augment_pair, check_crop, random_crop
from gradflow.em.data.volume import EMVolume
from gradflow.errors import GradflowError


def steps_per_epoch(volume: EMVolume, crop: int, batch_size: int) -> int:
    """Steps whose crops hold as many pixels as the whole volume (at least 1).

    With full 512 px slices this is the paper's epoch: every slice once.
    """
    h, w = volume.slice_shape
    return max(1, math.ceil(len(volume) * h * w / (crop * crop * batch_size)))


def epoch_batches(
    volume: EMVolume,
    *,
    crop: int,
    batch_size: int,
    steps: int,
    seed: int,
    epoch: int,
    augment: bool | Augmentation = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches ``(x, y)`` of ``[B, 1, crop, crop]`` float32 tensors for one epoch.

    Sample ``k`` of step ``s`` depends only on ``(seed, epoch, s, k)``: its slice comes from
    a per-epoch shuffle of all slices (so an epoch visits slices evenly) and its crop and
    transform from its own generator. So a resumed run gets exactly the same batches, and
    with ``world_size`` > 1 rank ``r`` yields samples ``r*B .. (r+1)*B - 1`` of each global
    batch, where ``B = batch_size // world_size``: the ranks' batches concatenated in rank
    order equal the single-process batch. ``augment``: ``True`` for the default
    :class:`Augmentation`, ``False`` for plain random crops, or an ``Augmentation``.
    """
    check_crop(crop, volume.slice_shape, volume.source)
    if len(volume) == 0:
        raise GradflowError(f"no slices to train on in {volume.source}")
    if batch_size < 1 or steps < 0 or seed < 0 or epoch < 0:
        raise GradflowError(
            f"need batch_size >= 1 and steps, seed, epoch >= 0; "
            f"got {batch_size}, {steps}, {seed}, {epoch}"
        )
    if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
        raise GradflowError(
            f"batch size {batch_size} cannot be split over {world_size} ranks (rank {rank})"
        )
    aug = augment if isinstance(augment, Augmentation) else (Augmentation() if augment else None)
    per_rank = batch_size // world_size
    # Checked above, generated lazily below: bad arguments fail at the call, not at first use.
    return _batches(
        volume,
        crop,
        batch_size,
        steps,
        seed,
        epoch,
        aug,
        range(rank * per_rank, (rank + 1) * per_rank),
    )


def _batches(
    volume: EMVolume,
    crop: int,
    batch_size: int,
    steps: int,
    seed: int,
    epoch: int,
    aug: Augmentation | None,
    samples: range,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = _slice_order(len(volume), steps * batch_size, seed, epoch)
    for step in range(steps):
        xs, ys = [], []
        for k in samples:
            index = order[step * batch_size + k]
            rng = np.random.default_rng([seed, epoch, step, k])
            image, label = volume.images[index], volume.labels[index]
            if aug is None:
                x, y = random_crop(image, label, crop, rng)
            else:
                x, y = augment_pair(image, label, rng, aug, crop=crop)
            xs.append(x)
            ys.append(y)
        yield (
            torch.from_numpy(np.stack(xs)[:, None]).float(),
            torch.from_numpy(np.stack(ys)[:, None]).float(),
        )


def _slice_order(n_slices: int, count: int, seed: int, epoch: int) -> np.ndarray:
    """``count`` slice indices: shuffles of all slices, one after another."""
    cycles = max(1, math.ceil(count / n_slices))
    perms = [
        np.random.default_rng([seed, epoch, cycle]).permutation(n_slices) for cycle in range(cycles)
    ]
    return np.concatenate(perms)[:count]
