"""``gradflow record``: argument parsing over :func:`gradflow.em.train.train`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from gradflow.cli.app import app
from gradflow.em.config import TrainConfig
from gradflow.errors import GradflowError
from gradflow.names import BUILTIN_PROBES, DEFAULT_PROBES

_DEFAULTS = TrainConfig()
_PROBES = ",".join(DEFAULT_PROBES)

EXAMPLES = """
Examples:

A quick CPU run on the built-in synthetic EM data (a few minutes):

  gradflow record --model fig3a-long-short-9 --data synthetic \\
    --epochs 20 --out runs/a.h5

The ISBI 2012 slices (a folder with train/images and train/labels):

  gradflow record --model fig3b-long-9 --data ../shared/data/isbi2012 \\
    --out runs/b.h5

Extend that run to 40 epochs from its checkpoint runs/b.h5.ckpt.pt:

  gradflow record --model fig3b-long-9 --data ../shared/data/isbi2012 \\
    --epochs 40 --out runs/b.h5 --resume

The paper's scale on a GPU (7 steps of 4 full slices = the 25 slices):

  gradflow record --model paper-resunet --data ../shared/data/isbi2012 \\
    --crop 512 --batch-size 4 --epochs 500 --steps-per-epoch 7 \\
    --device cuda --out runs/paper.h5

DDP over 4 GPUs (--batch-size is the global batch, split over the ranks):

  torchrun --standalone --nproc_per_node 4 -m gradflow.cli.main record \\
    --model paper-resunet --data ../shared/data/isbi2012 --crop 512 \\
    --batch-size 8 --steps-per-epoch 4 --device cuda --out runs/ddp.h5
"""


def _model_options(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as JSON (false, 0.1, "he"), else as text."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise GradflowError(f"--model-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


@app.command(epilog=EXAMPLES)
def record(
    model: Annotated[str, typer.Option(help="Zoo model (gradflow models).")] = _DEFAULTS.model,
    data: Annotated[
        str, typer.Option(help="ISBI 2012 folder, or 'synthetic'.", metavar="PATH|synthetic")
    ] = _DEFAULTS.data,
    epochs: Annotated[int, typer.Option(help="Epochs to train.")] = _DEFAULTS.epochs,
    steps_per_epoch: Annotated[
        int, typer.Option(help="Optimizer steps per epoch.")
    ] = _DEFAULTS.steps_per_epoch,
    crop: Annotated[int, typer.Option(help="Training crop side (px).")] = _DEFAULTS.crop,
    batch_size: Annotated[
        int, typer.Option(help="Global batch size (split over DDP ranks).")
    ] = _DEFAULTS.batch_size,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = _DEFAULTS.lr,
    optimizer: Annotated[
        str,
        typer.Option(help="rmsprop (the paper's), sgd or adam.", metavar="rmsprop|sgd|adam"),
    ] = _DEFAULTS.optimizer,
    momentum: Annotated[
        float | None,
        typer.Option(
            help="Momentum (adam: beta1). Default: 0 for rmsprop, 0.9 for sgd and adam.",
            show_default=False,
        ),
    ] = None,
    nesterov: Annotated[
        bool | None,
        typer.Option(
            "--nesterov/--no-nesterov",
            help="sgd only: Nesterov momentum.",
            show_default=f"--{'' if _DEFAULTS.nesterov else 'no-'}nesterov",
        ),
    ] = None,
    eps: Annotated[float, typer.Option(help="rmsprop and adam epsilon.")] = _DEFAULTS.eps,
    init: Annotated[
        str,
        typer.Option(
            help="default (zoo init: zero residual branches, classifier bias at the prior) "
            "or paper (the authors' Keras he_normal convolutions only).",
            metavar="default|paper",
        ),
    ] = _DEFAULTS.init,
    seed: Annotated[int, typer.Option(help="Seed of init, crops and dropout.")] = _DEFAULTS.seed,
    device: Annotated[
        str, typer.Option(help="cpu, cuda or cuda:N.", metavar="cpu|cuda")
    ] = _DEFAULTS.device,
    out: Annotated[
        Path | None, typer.Option(help="Run file to write (required).", metavar="RUN.h5")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue --out from its checkpoint.")
    ] = False,
    loss: Annotated[str, typer.Option(help="dice or bce.", metavar="dice|bce")] = _DEFAULTS.loss,
    every: Annotated[
        int | None, typer.Option(help="Record every N-th step (default 1).")
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(
            help="Instead of --every: the recorder's largest share of the wall time "
            "(e.g. 0.02); it picks the recorded steps."
        ),
    ] = None,
    val_every: Annotated[
        int, typer.Option(help="Validate every K epochs (0: never).")
    ] = _DEFAULTS.val_every,
    val_slices: Annotated[
        int | None, typer.Option(help="Validate on the first N of the 5 validation slices.")
    ] = None,
    flush_every: Annotated[
        int, typer.Option(help="Rows between run-file flushes.")
    ] = _DEFAULTS.flush_every,
    flush_seconds: Annotated[
        float, typer.Option(help="Seconds between run-file flushes.")
    ] = _DEFAULTS.flush_seconds,
    on_nonfinite: Annotated[
        str,
        typer.Option(help="stop (exit 1) or continue after a NaN/Inf.", metavar="stop|continue"),
    ] = _DEFAULTS.on_nonfinite,
    log_every: Annotated[
        int, typer.Option(help="Steps between progress lines.")
    ] = _DEFAULTS.log_every,
    no_augment: Annotated[
        bool, typer.Option("--no-augment", help="Plain random crops, no flips or rotations.")
    ] = False,
    probes: Annotated[
        str,
        typer.Option(
            help="Comma-separated probes to record (also: "
            f"{', '.join(sorted(BUILTIN_PROBES - set(DEFAULT_PROBES)))})."
        ),
    ] = _PROBES,
    model_option: Annotated[
        list[str] | None,
        typer.Option(
            help="Override a model config field, KEY=VALUE (repeatable), e.g. batch_norm=false.",
            metavar="KEY=VALUE",
        ),
    ] = None,
) -> None:
    """Train a zoo FCN on EM data while recording per-layer statistics into --out."""
    if out is None:
        raise GradflowError("missing --out RUN.h5: where should the run file go?")
    if every is not None and budget is not None:
        raise GradflowError("--every and --budget exclude each other: give one of them")
    config = TrainConfig(
        model=model,
        model_overrides=_model_options(model_option or []),
        data=data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        crop=crop,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,  # type: ignore[arg-type]  # checked by validate()
        momentum=momentum,
        nesterov=_DEFAULTS.nesterov if nesterov is None else nesterov,
        eps=eps,
        init=init,  # type: ignore[arg-type]  # checked by validate()
        seed=seed,
        device=device,
        loss=loss,
        augment=not no_augment,
        val_every=val_every,
        val_slices=val_slices,
        every=_DEFAULTS.every if every is None else every,
        budget=budget,
        probes=tuple(p.strip() for p in probes.split(",") if p.strip()),
        flush_every=flush_every,
        flush_seconds=flush_seconds,
        on_nonfinite=on_nonfinite,  # type: ignore[arg-type]  # checked by validate()
        log_every=log_every,
        command=shlex.join(["gradflow", *sys.argv[1:]]),
    )
    config.validate()  # an unknown --optimizer is named before the Nesterov check below
    if nesterov is not None and optimizer != "sgd":
        flag = "--nesterov" if nesterov else "--no-nesterov"
        raise GradflowError(f"{flag} applies to --optimizer sgd only, not {optimizer}")
    from gradflow.em.train import train  # torch loads here, not for --help

    summary = train(config, out, force=force, resume=resume)
    if summary is None:  # a DDP rank other than 0
        return
    Console().print(summary)
    if summary.interrupted is not None:  # SIGINT or SIGTERM: the shell's 128 + signal
        print(summary.interruption, file=sys.stderr)
        raise typer.Exit(128 + summary.interrupted)
    if summary.stop_reason is not None:
        print(f"gradflow: error: {summary.stop_reason}", file=sys.stderr)
        raise typer.Exit(1)
