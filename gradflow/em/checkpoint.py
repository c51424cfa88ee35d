"""Training checkpoints beside the run file (``RUN.h5`` -> ``RUN.h5.ckpt.pt``), written
atomically."""

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
    """The checkpoint file of a run file: ``RUN.h5`` -> ``RUN.h5.ckpt.pt``.

    The whole file name is kept, so ``x.h5`` and ``x.hdf5`` have checkpoints of their own.
    """
    path = Path(run_path)
    return path.with_name(f"{path.name}.ckpt.pt")


def legacy_checkpoint_path(run_path: str | os.PathLike[str]) -> Path:
    """The name older gradflow versions gave the checkpoint: ``RUN.h5`` -> ``RUN.ckpt.pt``."""
    path = Path(run_path)
    return path.with_name(f"{path.stem if path.suffix else path.name}.ckpt.pt")


def find_checkpoint(run_path: str | os.PathLike[str]) -> Path | None:
    """The checkpoint a resumed run continues from: :func:`checkpoint_path`, else the
    :func:`legacy_checkpoint_path` of a run written by an older version, else None."""
    for path in (checkpoint_path(run_path), legacy_checkpoint_path(run_path)):
        if path.is_file():
            return path
    return None


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
            f"{path}: checkpoint format {payload['format']!r}, this gradflow reads {FORMAT}"
        )
    problem = _problem(payload)
    if problem:
        raise GradflowError(f"{path}: damaged checkpoint ({problem})")
    return Checkpoint(
        model=payload["model"],
        optimizer=payload["optimizer"],
        epoch=payload["epoch"],
        step=payload["step"],
        config=payload["config"],
    )


def _problem(payload: dict[Any, Any]) -> str:
    """What is wrong with the types of a loaded checkpoint's fields ("" when nothing)."""
    model, optimizer = payload["model"], payload["optimizer"]
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        return "model is not a dict of named tensors"
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
    ):
        return "optimizer is not an optimizer state"
    for key in ("epoch", "step"):
        value = payload[key]
        if type(value) is not int or value < 0:
            return f"{key} is {value!r}, not a count"
    if not isinstance(payload["config"], dict):
        return "config is not a dict"
    return ""
