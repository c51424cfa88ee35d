"""One training run's steps: the optimizer, the loss (the global batch's under DDP),
validation, and the :class:`Trainer` that :func:`gradflow.em.train.train` drives."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradflow.budget import BudgetSchedule
from gradflow.em.checkpoint import (
    Checkpoint,
    save_checkpoint,
)
from gradflow.em.config import TrainConfig
from gradflow.em.data import EMVolume, epoch_batches
from gradflow.em.ddp import StopSignals, World
from gradflow.em.metrics import LOSSES, pixel_error, tiled_predict, v_info, v_rand
from gradflow.em.models import FCN, count_convs
from gradflow.recorder import Recorder

if TYPE_CHECKING:
    from gradflow.em.progress import ProgressDisplay

VAL_TILE = 512  # the paper's input size: larger slices are predicted in tiles
VAL_METRICS = ("val_loss", "pixel_error", "v_rand", "v_info")
_RENAMED = {"alpha": "rho"}  # torch's name -> the paper's (and the run file's)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer (RMSprop as in the paper by default), with L2 weight decay
    on convolution weights only."""
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in params if id(p) in conv_weights],
            "weight_decay": config.weight_decay,
        },
        {"params": [p for p in params if id(p) not in conv_weights], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    momentum = config.momentum_value
    if config.optimizer == "sgd":
        nesterov = config.nesterov and momentum > 0
        return torch.optim.SGD(groups, lr=config.lr, momentum=momentum, nesterov=nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=(momentum, 0.999), eps=config.eps)
    return torch.optim.RMSprop(
        groups, lr=config.lr, alpha=config.rho, eps=config.eps, momentum=momentum
    )


def _loss_sums(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sums a loss is a function of: Dice (sum y*p, sum p, sum y); BCE (sum, count)."""
    if name == "dice":
        p = torch.sigmoid(logits)
        return torch.stack([(p * target).sum(), p.sum(), target.sum()])
    total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return torch.stack([total, total.new_tensor(float(target.numel()))])


def _loss_from_sums(name: str, sums: torch.Tensor) -> torch.Tensor:
    """The loss from :func:`_loss_sums`, as :data:`gradflow.em.metrics.LOSSES` computes it."""
    if name == "dice":
        return 1.0 - (2.0 * sums[0] + 1.0) / (sums[1] + sums[2] + 1.0)
    return sums[0] / sums[1]


def _global_batch_loss(
    name: str, world_size: int, logits: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The loss of the whole global batch, equal on every rank.

    Each rank all-reduces the loss's sums (a few numbers, no autograd through the
    collective). The sums used carry ``world_size`` times the gradient of this rank's own
    sums, which DDP's gradient averaging turns into exactly the global batch's gradient.
    """
    local = _loss_sums(name, logits, target)
    total = local.detach().clone()
    dist.all_reduce(total)
    scaled = world_size * local
    return _loss_from_sums(name, scaled + (total - scaled).detach())


# -- validation ---------------------------------------------------------------------------------
def evaluate(
    model: FCN, volume: EMVolume, *, crop: int, loss: str = "dice", batch_size: int = 4
) -> dict[str, float]:
    """``val_loss`` (the training loss), ``pixel_error``, ``v_rand``, ``v_info`` on ``volume``.

    Slices up to 512 px a side are predicted whole (one tile: no seams, the model sees the
    whole context); larger ones in the largest tiles up to 512 px the model accepts, with a
    quarter-tile overlap whose outer half of each tile edge is dropped. The loss is computed
    in float64 from the predicted probabilities, clamped to [1e-12, 1 - 1e-12].
    """
    tile, overlap = _tiling(volume.slice_shape, crop, model.config.downsampling)
    probs = np.stack(
        [
            tiled_predict(model, image, tile=tile, overlap=overlap, batch_size=batch_size)
            for image in volume.images
        ]
    )
    labels = volume.labels
    logits = torch.logit(torch.from_numpy(probs).double(), eps=1e-12)
    return {
        "val_loss": float(LOSSES.get(loss)(logits, torch.from_numpy(labels).double())),
        "pixel_error": pixel_error(probs, labels),
        "v_rand": v_rand(probs, labels),
        "v_info": v_info(probs, labels),
    }


def _tiling(shape: tuple[int, int], crop: int, factor: int) -> tuple[int, int]:
    """(tile, overlap) for slices of ``shape``: see :func:`evaluate`."""
    tile = max(crop, min(*shape, VAL_TILE) // factor * factor)
    return tile, 0 if tile >= max(shape) else tile // 4


# -- one run ------------------------------------------------------------------------------------
class Trainer:
    """The model, optimizer and data of one run, and the steps that
    :func:`gradflow.em.train.train` composes."""

    def __init__(
        self,
        config: TrainConfig,
        world: World,
        device: torch.device,
        model: FCN,
        train_set: EMVolume,
        val_set: EMVolume,
        control: Any,
        signals: StopSignals,
    ) -> None:
        self.config, self.world, self.device = config, world, device
        self.model, self.train_set, self.val_set = model, train_set, val_set
        self.optimizer = build_optimizer(model, config)
        self.net: nn.Module = model
        self.loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = LOSSES.get(config.loss)
        if world.size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids)
            self.loss_fn = partial(_global_batch_loss, config.loss, world.size)
        self.control = control
        self.signals = signals
        self.stopped_by: int | None = None  # the signal that stopped training
        self.epoch = self.step = 0
        self.stopped_step: int | None = None
        self.train_seconds = 0.0
        self.steps_timed = 0
        self.val_seconds: list[float] = []

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: weights, optimizer state, epoch and step."""
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.epoch, self.step = checkpoint.epoch, checkpoint.step

    def run_epoch(self, epoch: int, rec: Recorder | None, bar: ProgressDisplay) -> float | None:
        """One epoch of steps: its mean train loss, or None when a non-finite value stopped it."""
        config, world = self.config, self.world
        self.net.train()
        torch.manual_seed(_epoch_seed(config.seed, epoch, world.rank))
        batches = epoch_batches(
            self.train_set,
            crop=config.crop,
            batch_size=config.batch_size,
            steps=config.steps_per_epoch,
            seed=config.seed,
            epoch=epoch,
            augment=config.augment,
            rank=world.rank,
            world_size=world.size,
        )
        total = torch.zeros((), device=self.device)
        timed_from: float | None = None  # the first step of an epoch is warm-up: not timed
        for x, y in batches:
            loss = self._step(x, y)
            if rec is not None:
                rec.log(loss=loss)
            total += loss.detach()
            bar.step(self.step, epoch, loss)
            self.step += 1
            if timed_from is None:
                timed_from = time.perf_counter()
            else:
                self.steps_timed += 1
            nonfinite, signalled = self._stop_flags(loss, rec)
            if nonfinite:
                self.stopped_step = self.step - 1
            if nonfinite or signalled:
                break
        mean = float(total) / config.steps_per_epoch  # waits for the GPU: the time is right
        if timed_from is not None:
            self.train_seconds += time.perf_counter() - timed_from
        return None if self.stopped_step is not None or self.stopped_by is not None else mean

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net(x), y)
        loss.backward()
        self.optimizer.step()
        return loss

    def _stop_flags(self, loss: torch.Tensor, rec: Recorder | None) -> tuple[bool, bool]:
        """(a non-finite value stops training, a signal stops it) after this step.

        Non-finite (with ``on_nonfinite="stop"``): this step or, by the recorder, a recent
        one saw a non-finite value. On the CPU reading the loss costs nothing; on CUDA it
        would wait for the GPU every step, so there only the recorder's event (filled by its
        writer thread) counts. Under DDP rank 0, which holds the recorder, decides for all
        ranks.
        """
        hit = False
        if self.config.on_nonfinite == "stop":
            hit = rec is not None and rec.first_nonfinite is not None
            if self.device.type == "cpu":
                hit = hit or not math.isfinite(loss.item())
        nonfinite, signalled = self._from_rank0([hit, self.signals.received is not None])
        if signalled:
            self.stopped_by = self.signals.received or signal.SIGTERM
        return nonfinite, signalled

    def interrupted(self) -> bool:
        """Whether a signal asks training to stop (rank 0 decides for all ranks)."""
        if self._from_rank0([self.signals.received is not None])[0]:
            self.stopped_by = self.signals.received or signal.SIGTERM
        return self.stopped_by is not None

    def _from_rank0(self, flags: list[bool]) -> list[bool]:
        if self.world.size == 1:
            return flags
        sent = torch.tensor(flags, dtype=torch.uint8)
        dist.broadcast(sent, src=0, group=self.control)
        return [bool(v) for v in sent.tolist()]

    def validate(self, epoch: int) -> dict[str, float]:
        """Validation metrics on rank 0 when ``epoch`` is due, NaN otherwise."""
        config = self.config
        due = config.val_every > 0 and (epoch + 1) % config.val_every == 0
        if not (due and self.world.main):
            return dict.fromkeys(VAL_METRICS, math.nan)
        t0 = time.perf_counter()
        metrics = evaluate(
            self.model,
            self.val_set,
            crop=config.crop,
            loss=config.loss,
            batch_size=config.batch_size,
        )
        self.val_seconds.append(time.perf_counter() - t0)
        return metrics

    def checkpoint(
        self, path: Path, *, epochs_done: int, recorder: dict[str, Any] | None
    ) -> None:
        """Rank 0 replaces the checkpoint (with the Recorder's state ``recorder``); every
        rank waits for it."""
        if self.world.main:
            save_checkpoint(
                path,
                Checkpoint(
                    model=self.model.state_dict(),
                    optimizer=self.optimizer.state_dict(),
                    epoch=epochs_done,
                    step=self.step,
                    config=asdict(replace(self.config, data=resolved_data(self.config.data))),
                    recorder=recorder,
                ),
            )
        if self.world.size > 1:
            dist.barrier(group=self.control)


def resolved_data(data: str) -> str:
    """``config.data`` as an absolute path (``"synthetic"`` stays itself)."""
    return data if data == "synthetic" else str(Path(data).expanduser().resolve())


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one epoch on one rank: dropout masks independent across ranks."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def budget_schedule(config: TrainConfig) -> BudgetSchedule | None:
    """The Recorder's budget schedule where ``config`` gives a budget, else None."""
    if config.budget is None:
        return None
    return BudgetSchedule(config.budget, steps_per_epoch=config.steps_per_epoch)


@contextmanager
def open_recorder(
    trainer: Trainer,
    out: Path,
    run_config: dict[str, Any],
    *,
    force: bool,
    state: dict[str, Any] | None,
) -> Iterator[Recorder | None]:
    """The Recorder on rank 0, continuing ``out`` from the Recorder state ``state`` where
    there is one; the other ranks record nothing."""
    if not trainer.world.main:
        yield None
        return
    config = trainer.config
    with Recorder(
        trainer.model,
        trainer.optimizer,
        out,
        every=None if config.budget is not None else config.every,
        budget=budget_schedule(config),
        probes=config.probes,
        flush_every=config.flush_every,
        flush_seconds=config.flush_seconds,
        config=run_config,
        overwrite=force,
    ) as rec:
        if state is not None:
            rec.load_state_dict(state)
        yield rec


def describe_run(config: TrainConfig, trainer: Trainer, source: str) -> dict[str, Any]:
    """The run file's ``config`` attribute: model, data, optimizer, seed, command line."""
    main_convs, _ = count_convs(trainer.model)
    return {
        "model": {
            "name": config.model,
            "overrides": dict(config.model_overrides),
            "conv_layers": main_convs,
            "n_params": sum(p.numel() for p in trainer.model.parameters()),
            "config": asdict(trainer.model.config),
        },
        "data": {
            "path": config.data,
            "source": source,
            "train_slices": len(trainer.train_set),
            "val_slices": len(trainer.val_set),
        },
        "optimizer": _optimizer_config(trainer.optimizer, config),
        "init": config.init,
        "loss": config.loss,
        "seed": config.seed,
        "epochs": config.epochs,
        "steps_per_epoch": config.steps_per_epoch,
        "crop": config.crop,
        "batch_size": config.batch_size,
        "augment": config.augment,
        "world_size": trainer.world.size,
        "device": str(trainer.device),
        "command": config.command,
    }


def _optimizer_config(optimizer: torch.optim.Optimizer, config: TrainConfig) -> dict[str, Any]:
    """The optimizer's class and hyperparameters as torch holds them (``rho`` for RMSprop's
    ``alpha``), with the weight decay of the convolution weights."""
    shown = ("lr", "alpha", "eps", "momentum", "nesterov", "betas")
    return {
        "name": type(optimizer).__name__,
        **{_RENAMED.get(k, k): v for k, v in optimizer.defaults.items() if k in shown},
        "weight_decay": config.weight_decay,
        "weight_decay_on": "convolution weights",
    }


# -- checks before anything runs ----------------------------------------------------------------
