"""Training checkpoints beside the run file (``RUN.h5`` -> ``RUN.ckpt.pt``), written atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradflow.errors import GradflowError

FORMAT = 1


@dataclass
class Checkpoint:
    """What a run needs to continue exactly where it stopped.

    ``epoch`` and ``step`` count the epochs and optimizer steps done. No random-number
    state is stored: training crops and dropout draws are pure functions of
    ``(seed, epoch, step)`` (the loop reseeds torch's RNG at every epoch start).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    step: int
    config: dict[str, Any]


def checkpoint_path(run_path: str | os.PathLike[str]) -> Path:
    """The checkpoint file of a run file: ``RUN.h5`` -> ``RUN.ckpt.pt``."""
    path = Path(run_path)
    return path.with_name(f"{path.stem if path.suffix else path.name}.ckpt.pt")


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to a temporary file, then rename it over ``path``.

    A crash leaves either the previous checkpoint or the new one, never half a file.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = {
        "format": FORMAT,
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "config": checkpoint.config,
    }
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise GradflowError(f"{path}: cannot write the checkpoint ({err.strerror or err})") from err


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; any problem is one GradflowError."""
    if not path.is_file():
        raise GradflowError(
            f"cannot resume: no checkpoint {path} (one is written at every epoch end)"
        )
    try:
        # weights_only: tensors and plain containers only, so loading runs no foreign code.
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GradflowError(f"{path}: not a readable gradflow checkpoint ({first})") from None
    keys = {"format", "model", "optimizer", "epoch", "step", "config"}
    if not isinstance(payload, dict) or not keys <= payload.keys():
        raise GradflowError(f"{path}: not a gradflow checkpoint")
    if payload["format"] != FORMAT:
        raise GradflowError(
            f"{path}: checkpoint format {payload['format']}, this gradflow reads {FORMAT}"
        )
    return Checkpoint(
        model=payload["model"],
        optimizer=payload["optimizer"],
        epoch=int(payload["epoch"]),
        step=int(payload["step"]),
        config=payload["config"],
    )
