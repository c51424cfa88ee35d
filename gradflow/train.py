"""The training loop of ``gradflow record``: an EM FCN trained with the Recorder attached.

A run: EM slices (ISBI 2012 or synthetic) split 25 train / 5 validation as in the paper, a
zoo model, RMSprop with L2 weight decay on convolution weights, the Dice loss (or BCE), a
:class:`~gradflow.Recorder` writing the run file, validation on whole slices and a
checkpoint beside the run file at every epoch end. Under ``torchrun`` it trains with
``DistributedDataParallel``, each rank on its shard of every global batch.

Reproducibility: a training crop depends only on ``(seed, epoch, step, sample)`` and torch's
RNG (dropout) is reseeded from ``(seed, epoch, rank)`` at every epoch start, so on the CPU
(deterministic algorithms on) a run repeats bitwise and a resumed run continues exactly as
an uninterrupted one. CUDA runs are seeded but not bitwise repeatable: nearest-neighbour
upsampling has no deterministic CUDA backward.

Under DDP the loss is the loss of the whole global batch on every rank (see
:func:`_global_batch_loss`): the Dice loss is not a mean over samples, so a per-rank Dice
would train a different objective than one process on the same batch. Batch norm keeps
per-rank batch statistics, as in standard DDP.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gradflow.checkpoint import (
    Checkpoint,
    checkpoint_path,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gradflow.config import N_VAL, RESUME_KEYS, TrainConfig
from gradflow.data import EMVolume, epoch_batches, load_dataset, split
from gradflow.data.augment import check_crop
from gradflow.data.synthetic import synthetic_source
from gradflow.errors import GradflowError
from gradflow.metrics import LOSSES, pixel_error, tiled_predict, v_info, v_rand
from gradflow.models import FCN, count_convs, create_model, paper_init
from gradflow.recorder import Recorder
from gradflow.runfile import Event, Run, WriteLock, check_writable, open_run
from gradflow.schedule import as_schedule

ProgressMode = Literal["auto", "bar", "lines", "off"]
VAL_TILE = 512  # the paper's input size: larger slices are predicted in tiles
VAL_METRICS = ("val_loss", "pixel_error", "v_rand", "v_info")
_RENAMED = {"alpha": "rho"}  # torch's name -> the paper's (and the run file's)


@dataclass(frozen=True)
class Summary:
    """What a run did, read back from its run file at the end.

    ``epochs`` and ``steps`` count the whole run (a resumed one too); the timings cover
    this call only: ``seconds_per_step`` is training time (data, forward, backward, step,
    recording) per step, leaving out each epoch's first step (warm-up: allocations, cuDNN
    autotuning); ``seconds_per_validation`` is one validation pass. NaN where none was timed.
    ``overhead`` is the recorder's measured time by part (:attr:`gradflow.Run.overhead`).
    """

    path: Path
    checkpoint: Path
    file_bytes: int
    model: str
    conv_layers: int
    n_params: int
    data: str
    epochs: int
    steps: int
    best_val_loss: float
    best_epoch: int | None
    last_val_epoch: int | None
    v_rand: float
    v_info: float
    seconds_per_step: float
    seconds_per_validation: float
    overhead: dict[str, float]
    nonfinite: Event | None
    stopped_step: int | None
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped training

    @property
    def interruption(self) -> str | None:
        """``gradflow: interrupted at step S; ...`` when a signal stopped training, else None.

        S counts the steps done; a resumed run continues from the last epoch end.
        """
        if self.interrupted is None:
            return None
        how = (
            "resume with --resume"
            if self.checkpoint.is_file()
            else "no checkpoint to resume from (one is written at every epoch end)"
        )
        return f"gradflow: interrupted at step {self.steps}; {how}"

    @property
    def stop_reason(self) -> str | None:
        """One line saying why training stopped early, or None when it ran to the end."""
        if self.stopped_step is None:
            return None
        event = self.nonfinite
        if event is None or event.step > self.stopped_step:
            what = f"at step {self.stopped_step}: the loss is not finite"
        else:
            what = f"at step {event.step} (epoch {event.epoch}): {event.detail}"
        return f"training stopped {what}; {self.path} keeps every step up to there"

    def __rich__(self) -> Panel:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        grid.add_row(
            "model",
            f"{self.model}: {self.conv_layers} conv layers, {self.n_params:,} parameters",
        )
        grid.add_row("data", self.data)
        # Timings not measured (no step timed, no validation run) are left out, not NaN.
        timings = [
            f"{seconds:.{digits}f} s/{what}"
            for seconds, digits, what in (
                (self.seconds_per_step, 3, "step"),
                (self.seconds_per_validation, 2, "validation"),
            )
            if math.isfinite(seconds)
        ]
        grid.add_row(
            "training",
            f"{_count(self.epochs, 'epoch')}, {_count(self.steps, 'step')}"
            + (f"; {', '.join(timings)}" if timings else ""),
        )
        if self.best_epoch is not None:
            grid.add_row("best val_loss", f"{self.best_val_loss:.4f} at epoch {self.best_epoch}")
            grid.add_row(
                "V_rand, V_info",
                f"{self.v_rand:.4f}, {self.v_info:.4f} (epoch {self.last_val_epoch})",
            )
        else:
            grid.add_row("validation", "none")
        checkpoint = f", {self.checkpoint}" if self.checkpoint.is_file() else ""
        grid.add_row("run file", f"{self.path} ({self.file_bytes / 2**20:.1f} MB){checkpoint}")
        grid.add_row("recorder", _overhead_text(self.overhead))
        if self.nonfinite is not None:
            grid.add_row(
                "non-finite",
                f"[red]{self.nonfinite.detail} at step {self.nonfinite.step}[/red]",
            )
        return Panel(grid, title="gradflow record", expand=False)


def train(
    config: TrainConfig,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    resume: bool = False,
    progress: ProgressMode = "auto",
) -> Summary | None:
    """Train as ``config`` says while the Recorder writes the run file ``out``.

    A checkpoint ``RUN.h5.ckpt.pt`` beside ``out`` is replaced at every epoch end. ``force``
    replaces an existing ``out`` (a regular file only); ``resume`` continues from the
    checkpoint, which must come from the same settings (see ``RESUME_KEYS``; ``epochs`` may
    grow to extend a run) and agree with the run file.
    ``progress``: "auto" (a bar on a terminal, else plain lines), "bar", "lines" or "off".

    Every setting, the data and the files are checked before anything is trained or
    written; problems raise :class:`GradflowError`. The run file's :class:`WriteLock` is
    held throughout: while another process writes ``out`` this one is refused. A run stopped
    by a non-finite value returns normally (see :attr:`Summary.stop_reason`), and so does
    one stopped by SIGINT or SIGTERM, at the next step boundary with the run file closed
    (see :attr:`Summary.interruption`). Under torchrun only rank 0 records, validates and
    checkpoints; the other ranks return None.
    """
    config.validate()
    if force and resume:
        raise GradflowError("force and resume exclude each other")
    world = _World.from_env()
    if config.batch_size % world.size:
        raise GradflowError(
            f"batch size {config.batch_size} (the global batch) is not divisible by the "
            f"{world.size} processes"
        )
    device = _device(config.device, world)
    out = Path(out)
    _check_paths(out, force=force, resume=resume)
    with torch.device("meta"):  # the model's shape only: no memory, no initialisation cost
        _check_model(create_model(config.model, **config.model_overrides), config, world)
    # Real data is read before any progress line, so that a bad folder is the only line.
    data = None if config.data == "synthetic" else _load_data(config, _silent)
    say = _say if progress != "off" and world.main else _silent
    say(f"building model {config.model} (seed {config.seed}, {config.init} init)...")
    model = build_model(config)
    # Taken before any file is checked, deleted or replaced; released when training ends.
    with WriteLock.acquire(out) if world.main else nullcontext():
        return _train(
            config,
            out,
            world,
            device,
            model,
            data or _load_data(config, say),
            force=force,
            resume=resume,
            progress=progress,
            say=say,
        )


def _train(
    config: TrainConfig,
    out: Path,
    world: _World,
    device: torch.device,
    model: FCN,
    data: tuple[EMVolume, EMVolume, str],
    *,
    force: bool,
    resume: bool,
    progress: ProgressMode,
    say: Callable[[str], None],
) -> Summary | None:
    """:func:`train` once its settings are checked, under the run file's write lock."""
    checkpoint = _check_outputs(out, config, model, force=force, resume=resume, device=device)
    train_set, val_set, source = data
    ckpt_file = checkpoint_path(out)
    if checkpoint is None and world.main:
        ckpt_file.unlink(missing_ok=True)  # a stale checkpoint must not resume this new run

    with (
        _determinism(device),
        _process_group(world, device) as control,
        _StopSignals() as signals,
    ):
        trainer = _Trainer(
            config, world, device, model.to(device), train_set, val_set, control, signals
        )
        if checkpoint is not None:
            trainer.restore(checkpoint)
        run_config = _run_config(config, trainer, source)
        with (
            _recorder(trainer, out, run_config, force=force, resumed=checkpoint is not None) as rec,
            _Progress(
                progress if world.main else "off",
                total=config.epochs * config.steps_per_epoch,
                done=trainer.step,
                batch_size=config.batch_size,
                log_every=config.log_every,
            ) as bar,
        ):
            for epoch in range(trainer.epoch, config.epochs):
                if trainer.interrupted():
                    break
                train_loss = trainer.run_epoch(epoch, rec, bar)
                if train_loss is None:
                    break
                metrics = trainer.validate(epoch)
                if rec is not None:
                    rec.epoch_end(train_loss=train_loss, **metrics, lr=trainer.lr)
                    rec.flush()  # the run file holds this epoch before the checkpoint does
                trainer.checkpoint(ckpt_file, epochs_done=epoch + 1)
                bar.note(_epoch_line(epoch, train_loss, metrics))
    return _summarize(out, config, trainer, source) if world.main else None


# -- the model, the optimizer, the loss ---------------------------------------------------------
def build_model(config: TrainConfig) -> FCN:
    """The configured zoo model, initialised from ``config.seed`` (the same on every rank)
    by the zoo's init or, with ``config.init == "paper"``, by :func:`paper_init`."""
    torch.manual_seed(config.seed)
    model = create_model(config.model, **config.model_overrides)
    if config.init == "paper":
        paper_init(model)
    return model


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
    """The loss from :func:`_loss_sums`, as :data:`gradflow.metrics.LOSSES` computes it."""
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
class _Trainer:
    """The model, optimizer and data of one run, and the steps :func:`train` composes."""

    def __init__(
        self,
        config: TrainConfig,
        world: _World,
        device: torch.device,
        model: FCN,
        train_set: EMVolume,
        val_set: EMVolume,
        control: Any,
        signals: _StopSignals,
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

    def run_epoch(self, epoch: int, rec: Recorder | None, bar: _Progress) -> float | None:
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

    def checkpoint(self, path: Path, *, epochs_done: int) -> None:
        """Rank 0 replaces the checkpoint; every rank waits for it."""
        if self.world.main:
            save_checkpoint(
                path,
                Checkpoint(
                    model=self.model.state_dict(),
                    optimizer=self.optimizer.state_dict(),
                    epoch=epochs_done,
                    step=self.step,
                    config=asdict(replace(self.config, data=_resolved_data(self.config.data))),
                ),
            )
        if self.world.size > 1:
            dist.barrier(group=self.control)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one epoch on one rank: dropout masks independent across ranks."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _recorder(
    trainer: _Trainer, out: Path, run_config: dict[str, Any], *, force: bool, resumed: bool
) -> AbstractContextManager[Recorder | None]:
    """The Recorder on rank 0; the other ranks record nothing."""
    if not trainer.world.main:
        return nullcontext(None)
    config = trainer.config
    return Recorder(
        trainer.model,
        trainer.optimizer,
        out,
        every=config.every,
        probes=config.probes,
        flush_every=config.flush_every,
        flush_seconds=config.flush_seconds,
        config=run_config,
        overwrite=force,
        resume=(trainer.step, trainer.epoch) if resumed else None,
    )


def _run_config(config: TrainConfig, trainer: _Trainer, source: str) -> dict[str, Any]:
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
def _check_paths(out: Path, *, force: bool, resume: bool) -> None:
    """The quick checks of ``out`` (and of its checkpoint to resume), before anything is built;
    :func:`_check_outputs` checks again, and fully, under the write lock."""
    check_writable(out, overwrite=force or resume)
    if resume and find_checkpoint(out) is None:
        load_checkpoint(checkpoint_path(out))  # raises its one-line "no checkpoint" error


def _check_model(model: FCN, config: TrainConfig, world: _World) -> None:
    """The crop suits ``model`` (and the synthetic slices), and so does the batch per process."""
    try:
        model.check_input_size(config.crop, config.crop)
    except GradflowError as err:
        raise GradflowError(f"crop {config.crop} does not suit {config.model}: {err}") from None
    if config.data == "synthetic":  # real slices are checked once read
        size = config.synthetic_size
        check_crop(config.crop, (size, size), synthetic_source(config.synthetic_slices, size, 0))
    _check_batch_norm(model, config.crop, config.batch_size // world.size)


def _check_outputs(
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
    checkpoint = load_checkpoint(found or checkpoint_path(out), map_location=device)
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
    return checkpoint


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
    try:
        optimizer.load_state_dict(checkpoint.optimizer)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GradflowError(f"{where}: its optimizer state does not fit ({first})") from None
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise GradflowError(
                    f"{where}: its optimizer state {key} is {tuple(value.shape)} for a "
                    f"parameter of {tuple(param.shape)}"
                )


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
    schedule = as_schedule(config.every)
    expected = np.array([s for s in range(step) if schedule(s)], np.int64)
    steps = run.steps
    if not np.array_equal(steps[steps < step], expected):
        raise GradflowError(
            f"{where}: the run file does not hold the {len(expected)} recorded steps before "
            f"step {step}"
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


def _check_batch_norm(model: nn.Module, crop: int, batch_per_process: int) -> None:
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
        return _resolved_data(value)
    if key == "probes" and isinstance(value, list | tuple):
        return sorted(set(value))
    return list(value) if isinstance(value, tuple) else value


def _resolved_data(data: str) -> str:
    """``config.data`` as an absolute path (``"synthetic"`` stays itself)."""
    return data if data == "synthetic" else str(Path(data).expanduser().resolve())


def _load_data(config: TrainConfig, say: Callable[[str], None]) -> tuple[EMVolume, EMVolume, str]:
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


class _StopSignals:
    """SIGINT and SIGTERM ask training to stop at the next step boundary.

    The first signal is only noted in :attr:`received`; the handlers in place before are
    restored then, so a second one acts at once (a second Ctrl-C raises KeyboardInterrupt).
    Handlers can only be set in the main thread; elsewhere signals keep their handlers, and
    so do ignored signals.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT under nohup
                    self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


# -- the machine --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _World:
    """This process's place in a torchrun launch (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> _World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _device(name: str, world: _World) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GradflowError(f"--device {name}: CUDA is not available on this machine")
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device(name)


@contextmanager
def _process_group(world: _World, device: torch.device) -> Iterator[Any]:
    """Join torchrun's process group; yields the group for flags and barriers (None alone)."""
    if world.size == 1:
        yield None
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        # Flags and barriers go over the CPU, so they never wait for queued GPU work.
        yield dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    finally:
        dist.destroy_process_group()


@contextmanager
def _determinism(device: torch.device) -> Iterator[None]:
    """Deterministic algorithms on the CPU; cuDNN autotuning (fixed crop sizes) on CUDA."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


# -- progress and summary -----------------------------------------------------------------------
class _Progress:
    """A rich bar on a terminal, else a flushed line every ``log_every`` steps."""

    def __init__(
        self, mode: ProgressMode, *, total: int, done: int, batch_size: int, log_every: int
    ) -> None:
        self.mode = ("bar" if sys.stdout.isatty() else "lines") if mode == "auto" else mode
        self.total, self.done = total, done
        self.batch_size, self.log_every = batch_size, log_every
        self._bar: Progress | None = None
        self._task: Any = None
        self._since = time.perf_counter()
        self._images = 0

    def __enter__(self) -> _Progress:
        if self.mode == "bar":
            self._bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[speed]} img/s"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "steps", total=self.total, completed=self.done, epoch="-", loss="-", speed="-"
            )
        self._since = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def step(self, step: int, epoch: int, loss: torch.Tensor) -> None:
        """After optimizer step ``step`` (0-based, as in the run file)."""
        if self.mode == "off":
            return
        self._images += self.batch_size
        if self._bar is not None:
            self._bar.update(self._task, advance=1, epoch=epoch)
        if step % self.log_every:
            return
        value = loss.item()  # on CUDA the one wait for the GPU every log_every steps
        now = time.perf_counter()
        speed = self._images / max(now - self._since, 1e-9)
        self._since, self._images = now, 0
        if self._bar is not None:
            self._bar.update(self._task, loss=f"{value:.4f}", speed=f"{speed:.1f}")
        else:
            print(f"step {step} epoch {epoch} loss {value:.4f} ({speed:.1f} img/s)", flush=True)

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode == "lines":
            print(text, flush=True)


def _say(text: str) -> None:
    """One line on what the run is doing before its first step."""
    print(text, flush=True)


def _silent(text: str) -> None:
    """Says nothing (progress off, or a DDP rank other than 0)."""


def _epoch_line(epoch: int, train_loss: float, metrics: Mapping[str, float]) -> str:
    shown = {k: v for k, v in metrics.items() if not math.isnan(v)}
    parts = [f"train_loss {train_loss:.4f}", *(f"{k} {v:.4f}" for k, v in shown.items())]
    return f"epoch {epoch} " + " ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _overhead_text(overhead: Mapping[str, float]) -> str:
    spent = sum(v for k, v in overhead.items() if k != "wall")
    wall = overhead.get("wall", 0.0)
    share = f" ({100 * spent / wall:.1f} %)" if wall else ""
    return f"{spent:.2f} s of {wall:.1f} s wall{share}"


def _summarize(out: Path, config: TrainConfig, trainer: _Trainer, source: str) -> Summary:
    with open_run(out) as run:
        metrics = run.metrics
        epochs = run.epochs
        val = metrics.get("val_loss", np.full(len(epochs), np.nan))
        validated = np.flatnonzero(~np.isnan(val))
        best = int(validated[np.argmin(val[validated])]) if validated.size else None
        last = int(validated[-1]) if validated.size else None
        nan = math.nan
        summary = Summary(
            path=out,
            checkpoint=find_checkpoint(out) or checkpoint_path(out),
            file_bytes=out.stat().st_size,
            model=config.model,
            conv_layers=count_convs(trainer.model)[0],
            n_params=sum(p.numel() for p in trainer.model.parameters()),
            data=f"{source}: {len(trainer.train_set)} train, {len(trainer.val_set)} validation",
            epochs=run.n_epochs,
            steps=trainer.step,
            best_val_loss=float(val[best]) if best is not None else nan,
            best_epoch=int(epochs[best]) if best is not None else None,
            last_val_epoch=int(epochs[last]) if last is not None else None,
            v_rand=float(metrics["v_rand"][last]) if last is not None else nan,
            v_info=float(metrics["v_info"][last]) if last is not None else nan,
            seconds_per_step=trainer.train_seconds / trainer.steps_timed
            if trainer.steps_timed
            else nan,
            seconds_per_validation=float(np.mean(trainer.val_seconds))
            if trainer.val_seconds
            else nan,
            overhead=run.overhead,
            nonfinite=run.first_nonfinite,
            stopped_step=trainer.stopped_step,
            interrupted=trainer.stopped_by,
        )
    return summary
