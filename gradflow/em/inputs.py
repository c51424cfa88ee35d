"""What a run starts from, checked before anything is trained or written: the output
paths, the model, a checkpoint and run file to resume, and the data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradflow.em.checkpoint import (
    Checkpoint,
    check_optimizer_state,
    checkpoint_path,
    find_checkpoint,
    load_checkpoint,
    recorder_state_of,
    size_limit,
)
from gradflow.em.config import N_VAL, RESUME_KEYS, TrainConfig
from gradflow.em.data import EMVolume, load_dataset, split
from gradflow.em.data.augment import check_crop
from gradflow.em.data.synthetic import synthetic_source
from gradflow.em.ddp import World
from gradflow.em.loop import budget_schedule, build_optimizer, resolved_data
from gradflow.em.models import FCN
from gradflow.errors import GradflowError
from gradflow.recorder.state import checked_state
from gradflow.runfile import Run, check_writable, open_run
from gradflow.schedule import as_schedule


def check_paths(out: Path, *, force: bool, resume: bool) -> None:
    """The quick checks of ``out`` (and of its checkpoint to resume), before anything is built;
    :func:`check_outputs` checks again, and fully, under the write lock."""
    check_writable(out, overwrite=force or resume)
    if resume and find_checkpoint(out) is None:
        load_checkpoint(checkpoint_path(out))  # raises its one-line "no checkpoint" error


def check_model(model: FCN, config: TrainConfig, world: World) -> None:
    """The crop suits ``model`` (and the synthetic slices), and so does the batch per process."""
    try:
        model.check_input_size(config.crop, config.crop)
    except GradflowError as err:
        raise GradflowError(f"crop {config.crop} does not suit {config.model}: {err}") from None
    if config.data == "synthetic":  # real slices are checked once read
        size = config.synthetic_size
        check_crop(config.crop, (size, size), synthetic_source(config.synthetic_slices, size, 0))
    check_batch_norm(model, config.crop, config.batch_size // world.size)


def check_outputs(
    out: Path,
    config: TrainConfig,
    model: FCN,
    *,
    force: bool,
    resume: bool,
    device: torch.device,
) -> Checkpoint | None:
    """Fail before training when ``out`` must not be written; load the checkpoint to resume
    and check it against the settings, the model and the run file."""
    if not resume:
        check_writable(out, overwrite=force)
        return None
    check_writable(out, overwrite=True)  # a regular file (or none: open_run says so)
    found = find_checkpoint(out)
    limit = size_limit(model.state_dict())
    checkpoint = load_checkpoint(found or checkpoint_path(out), device, max_bytes=limit)
    where = f"cannot resume {out} from {found}"
    # A setting added since an older checkpoint was written is missing from it: it had the
    # default, which keeps the behaviour of before.
    saved = {**asdict(TrainConfig()), **checkpoint.config}
    changed = [
        f"{key} {saved.get(key)!r} -> {value!r}"
        for key, value in asdict(config).items()
        if key in RESUME_KEYS and _comparable(key, saved.get(key)) != _comparable(key, value)
    ]
    if changed:
        raise GradflowError(
            f"{where} with other settings than its checkpoint's: {', '.join(changed)} "
            "(only epochs, validation, logging and flush may change)"
        )
    if checkpoint.epoch >= config.epochs:
        raise GradflowError(
            f"cannot resume {out}: it already has {checkpoint.epoch} epochs; "
            f"raise epochs above {checkpoint.epoch} to extend it"
        )
    if checkpoint.epoch < 1 or checkpoint.step != checkpoint.epoch * config.steps_per_epoch:
        raise GradflowError(
            f"{where}: its step {checkpoint.step} is not the end of epoch {checkpoint.epoch} "
            f"({config.steps_per_epoch} steps per epoch)"
        )
    _check_state(where, checkpoint, model, config)
    with open_run(out) as run:
        _check_run_file(where, run, checkpoint, config, model)
    return replace(checkpoint, recorder=_recorder_state(where, checkpoint, out, config))


def _recorder_state(
    where: str, checkpoint: Checkpoint, out: Path, config: TrainConfig
) -> dict[str, Any]:
    """The Recorder state to continue ``out`` from (:func:`recorder_state_of`), at the
    checkpoint's step and epoch."""
    budget = budget_schedule(config)
    state = recorder_state_of(checkpoint, out, budget)
    try:
        step, epoch, _ = checked_state(state, out, budget)
    except GradflowError as err:
        raise GradflowError(f"{where}: {err}") from None
    if (step, epoch) != (checkpoint.step, checkpoint.epoch):
        raise GradflowError(
            f"{where}: its Recorder state is at step {step} of epoch {epoch}, the checkpoint "
            f"at step {checkpoint.step} of epoch {checkpoint.epoch}"
        )
    return state


def _check_state(where: str, checkpoint: Checkpoint, model: FCN, config: TrainConfig) -> None:
    """The checkpoint's weights and optimizer state fit ``model``, shape by shape."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {name: tuple(t.shape) for name, t in checkpoint.model.items()}
    for name in sorted(expected.keys() | stored.keys()):
        if expected.get(name) != stored.get(name):
            raise GradflowError(
                f"{where}: its weights do not fit {config.model}: {name} is "
                f"{stored.get(name, 'missing')} in the checkpoint, the model has "
                f"{expected.get(name, 'none')}"
            )
    optimizer = build_optimizer(model, config)
    check_optimizer_state(where, checkpoint.optimizer, optimizer, steps=checkpoint.step)
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GradflowError(f"{where}: its optimizer state does not fit ({first})") from None


def _check_run_file(
    where: str, run: Run, checkpoint: Checkpoint, config: TrainConfig, model: FCN
) -> None:
    """The run file holds exactly what was recorded up to the checkpoint, for this model."""
    epoch, step = checkpoint.epoch, checkpoint.step
    if run.n_epochs < epoch:
        raise GradflowError(
            f"{where}: the run file holds {run.n_epochs} epochs but the checkpoint "
            f"{epoch} (the run file was not flushed before the process ended)"
        )
    ended = int(run.epoch_end_step[epoch - 1])
    if ended != step:
        raise GradflowError(
            f"{where}: epoch {epoch} ended at step {ended} in the run file, at step {step} "
            "in the checkpoint"
        )
    steps = run.steps
    before = steps[steps < step]
    if config.budget is not None:
        # The budget chose the steps by the clock; it always records step 0 and every
        # epoch's last step, so a file flushed up to the checkpoint holds both.
        if step and (len(before) == 0 or before[0] != 0 or before[-1] != step - 1):
            raise GradflowError(
                f"{where}: the run file does not hold step 0 and step {step - 1}, the last of "
                f"epoch {epoch - 1}, which the budget records"
            )
    else:
        schedule = as_schedule(config.every)
        expected = np.array([s for s in range(step) if schedule(s)], np.int64)
        if not np.array_equal(before, expected):
            raise GradflowError(
                f"{where}: the run file does not hold the {len(expected)} recorded steps "
                f"before step {step}"
            )
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if sum(layer.n_params for layer in run.layers) != n_params:
        raise GradflowError(
            f"{where}: the run file's layers do not hold the {n_params} parameters of "
            f"{config.model}"
        )
    if set(run.probes()) != set(config.probes):
        raise GradflowError(
            f"{where}: the run file records probes {sorted(run.probes())}, the settings "
            f"{sorted(config.probes)}"
        )


def check_batch_norm(model: nn.Module, crop: int, batch_per_process: int) -> None:
    """Batch norm in training needs more than one value per channel: at the bottleneck,
    the smallest feature map, a batch of ``batch_per_process`` crops of ``crop`` px has
    ``batch * (crop / downsampling)^2`` of them."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    factor = model.config.downsampling if isinstance(model, FCN) else 1
    side = crop // factor
    if batch_per_process * side * side < 2:
        raise GradflowError(
            f"batch norm needs more than one value per channel: a batch of "
            f"{batch_per_process} with crop {crop} leaves {side}x{side} px at the bottleneck "
            f"(downsampling {factor}); use a batch size of at least 2 or crop {2 * factor}"
        )


def _comparable(key: str, value: Any) -> Any:
    """A setting as resuming compares it: data paths resolved, probes as a set."""
    if key == "data" and isinstance(value, str):
        return resolved_data(value)
    if key == "probes" and isinstance(value, list | tuple):
        return sorted(set(value))
    return list(value) if isinstance(value, tuple) else value


def load_data(config: TrainConfig, say: Callable[[str], None]) -> tuple[EMVolume, EMVolume, str]:
    """(train, validation, description of the data); the crop must fit the slices."""
    volume = load_dataset(
        config.data,
        seed=0,
        n_synthetic=config.synthetic_slices,
        synthetic_size=config.synthetic_size,
        say=say,
    )
    check_crop(config.crop, volume.slice_shape, volume.source)
    train_set, val_set = split(volume, N_VAL)
    n = config.val_slices
    if n is not None and n < len(val_set):
        val_set = EMVolume(val_set.images[:n], val_set.labels[:n], f"{val_set.source}, first {n}")
    return train_set, val_set, volume.source
