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
:func:`gradflow.em.loop._global_batch_loss`): the Dice loss is not a mean over samples, so
a per-rank Dice would train a different objective than one process on the same batch.
Batch norm keeps per-rank batch statistics, as in standard DDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from gradflow.em.checkpoint import (
    checkpoint_path,
)
from gradflow.em.config import TrainConfig
from gradflow.em.data import EMVolume
from gradflow.em.ddp import StopSignals, World, determinism, pick_device, process_group
from gradflow.em.inputs import check_model, check_outputs, check_paths, load_data
from gradflow.em.loop import Trainer, describe_run, open_recorder
from gradflow.em.models import FCN, create_model, paper_init
from gradflow.em.progress import (
    ProgressDisplay,
    ProgressMode,
    Summary,
    console_say,
    epoch_line,
    silent,
    summarize,
)
from gradflow.errors import GradflowError
from gradflow.runfile import WriteLock


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
    world = World.from_env()
    if config.batch_size % world.size:
        raise GradflowError(
            f"batch size {config.batch_size} (the global batch) is not divisible by the "
            f"{world.size} processes"
        )
    device = pick_device(config.device, world)
    out = Path(out)
    check_paths(out, force=force, resume=resume)
    with torch.device("meta"):  # the model's shape only: no memory, no initialisation cost
        check_model(create_model(config.model, **config.model_overrides), config, world)
    # Real data is read before any progress line, so that a bad folder is the only line.
    data = None if config.data == "synthetic" else load_data(config, silent)
    say = console_say if progress != "off" and world.main else silent
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
            data or load_data(config, say),
            force=force,
            resume=resume,
            progress=progress,
            say=say,
        )


def _train(
    config: TrainConfig,
    out: Path,
    world: World,
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
    checkpoint = check_outputs(out, config, model, force=force, resume=resume, device=device)
    train_set, val_set, source = data
    ckpt_file = checkpoint_path(out)
    if checkpoint is None and world.main:
        ckpt_file.unlink(missing_ok=True)  # a stale checkpoint must not resume this new run

    with (
        determinism(device),
        process_group(world, device) as control,
        StopSignals() as signals,
    ):
        trainer = Trainer(
            config, world, device, model.to(device), train_set, val_set, control, signals
        )
        if checkpoint is not None:
            trainer.restore(checkpoint)
        run_config = describe_run(config, trainer, source)
        with (
            open_recorder(
                trainer,
                out,
                run_config,
                force=force,
                state=checkpoint.recorder if checkpoint is not None else None,
            ) as rec,
            ProgressDisplay(
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
                state = None
                if rec is not None:
                    rec.epoch_end(train_loss=train_loss, **metrics, lr=trainer.lr)
                    state = rec.state_dict()  # waits until the run file holds this epoch
                trainer.checkpoint(ckpt_file, epochs_done=epoch + 1, recorder=state)
                bar.note(epoch_line(epoch, train_loss, metrics))
    return summarize(out, config, trainer, source) if world.main else None


# -- the model, the optimizer, the loss ---------------------------------------------------------
def build_model(config: TrainConfig) -> FCN:
    """The configured zoo model, initialised from ``config.seed`` (the same on every rank)
    by the zoo's init or, with ``config.init == "paper"``, by :func:`paper_init`."""
    torch.manual_seed(config.seed)
    model = create_model(config.model, **config.model_overrides)
    if config.init == "paper":
        paper_init(model)
    return model
