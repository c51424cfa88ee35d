"""Training checkpoints beside the run file (``RUN.h5`` -> ``RUN.h5.ckpt.pt``), written
atomically and read as untrusted input: the archive's unpacked size is bounded before
torch reads it, and every optimizer setting and state value is checked against the run's
own settings before training resumes (:func:`check_optimizer_state`).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradflow.budget import BudgetSchedule
from gradflow.errors import GradflowError
from gradflow.recorder.state import recorder_state
from gradflow.runfile import printable
from gradflow.safefile import atomic_write

FORMAT = 1
# A checkpoint holds the weights and at most three optimizer tensors per parameter
# (RMSprop centred with momentum; Adam keeps two), plus the pickled structure and the
# archive's headers (a few hundred bytes per tensor).
SIZE_FACTOR = 4
SIZE_SLACK = 4 << 20
# The lines of torch.load's weights_only errors around the one that says what was refused.
_TORCH_ADVICE = ("Weights only load failed", "(1)", "(2)", "Check the documentation")
# Optimizer states that are running averages of squares: never negative.
NON_NEGATIVE = frozenset({"square_avg", "exp_avg_sq", "max_exp_avg_sq"})


@dataclass
class Checkpoint:
    """What a run needs to continue exactly where it stopped.

    ``epoch`` and ``step`` count the epochs and optimizer steps done; ``recorder`` is the
    Recorder's :meth:`~gradflow.Recorder.state_dict` at that point (None in a checkpoint
    written before checkpoints held it: see :func:`recorder_state_of`). No random-number
    state is stored: training crops and dropout draws are pure functions of
    ``(seed, epoch, step)`` (the loop reseeds torch's RNG at every epoch start).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    epoch: int
    step: int
    config: dict[str, Any]
    recorder: dict[str, Any] | None = None


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
    """Write ``checkpoint`` to a new file of an unpredictable name beside ``path``, then
    rename it over ``path`` (:func:`~gradflow.safefile.atomic_write`).

    A crash leaves either the previous checkpoint or the new one, never half a file.
    """
    payload = {
        "format": FORMAT,
        "model": checkpoint.model,
        "optimizer": checkpoint.optimizer,
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "config": checkpoint.config,
        "recorder": checkpoint.recorder,
    }
    try:
        with atomic_write(path) as file:
            torch.save(payload, file)
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as RuntimeError
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        first = (why.strip().splitlines() or [type(err).__name__])[0]
        raise GradflowError(f"{path}: cannot write the checkpoint ({first})") from err


def size_limit(model_state: Mapping[str, torch.Tensor]) -> int:
    """The most bytes a checkpoint of a model with ``model_state`` holds unpacked."""
    weights = sum(t.numel() * t.element_size() for t in model_state.values())
    return SIZE_FACTOR * weights + SIZE_SLACK


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_archive(path: Path, max_bytes: int) -> None:
    """The checkpoint is a zip archive (torch's format) whose members, unpacked, hold at
    most ``max_bytes``: torch allocates each member's declared size while it loads, so a
    small file could otherwise claim gigabytes (a deflated run of zeros)."""
    size = path.stat().st_size
    if size > max_bytes:
        raise GradflowError(
            f"{path}: {_gib(size)}, more than a checkpoint of this model can hold "
            f"({_gib(max_bytes)}); not reading it"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise GradflowError(
            f"{path}: not a readable gradflow checkpoint (not a zip archive: {err})"
        ) from None
    if unpacked > max_bytes:
        raise GradflowError(
            f"{path}: holds {_gib(unpacked)} unpacked, more than a checkpoint of this model "
            f"can ({_gib(max_bytes)}); not reading it"
        )


def load_checkpoint(
    path: Path, map_location: torch.device | str = "cpu", *, max_bytes: int | None = None
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; any problem is one GradflowError.

    Args:
        path: the checkpoint file.
        map_location: where its tensors go.
        max_bytes: refuse, before torch reads anything, a file or archive holding more
            than this unpacked (:func:`size_limit` of the model to resume); None: no bound.

    Returns:
        The checkpoint, its fields type-checked (its values are checked against a run's
        settings by :func:`check_optimizer_state`).
    """
    if not path.is_file():
        raise GradflowError(
            f"cannot resume: no checkpoint {path} (one is written at every epoch end)"
        )
    if max_bytes is not None:
        _check_archive(path, max_bytes)
    try:
        # weights_only: tensors and plain containers only, so loading runs no foreign code.
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # The line that says what was refused, not torch's advice around it; it may quote
        # the file (a global's name), so it is made printable.
        found = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
        why = printable((found or lines or [type(err).__name__])[0])
        raise GradflowError(f"{path}: not a readable gradflow checkpoint ({why})") from None
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
        recorder=payload.get("recorder"),
    )


def recorder_state_of(
    checkpoint: Checkpoint, run_path: str | os.PathLike[str], budget: BudgetSchedule | None
) -> dict[str, Any]:
    """The Recorder state that a run resumed from ``checkpoint`` continues from.

    Args:
        checkpoint: the checkpoint of the run file ``run_path``.
        run_path: the run file to continue.
        budget: the budget schedule the resumed Recorder gets, if any.

    Returns:
        The state saved in the checkpoint, of ``run_path``: the checkpoint is the one named
        after that run file and checked against its contents, so a moved or copied folder
        resumes. A checkpoint written before checkpoints held the state gets that of its
        step and epoch, the budget schedule (if any) starting afresh.
    """
    path = Path(run_path)
    if checkpoint.recorder is None:
        return recorder_state(path, checkpoint.step, checkpoint.epoch, budget)
    return {**checkpoint.recorder, "path": str(path.resolve())}


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
    if not isinstance(payload.get("recorder"), dict | None):
        return "recorder is not a Recorder state"
    return ""


def check_optimizer_state(
    where: str, saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, *, steps: int
) -> None:
    """Refuse an optimizer state that is not one ``optimizer`` itself could have saved.

    ``optimizer`` is built from the run's settings. Every setting of every parameter group
    (the learning rate, momentum, ...) must be of the right type, finite, non-negative
    (the learning rate and eps positive) and equal to the run's: a checkpoint that says
    ``lr=1e6`` for a run of ``lr=0.001`` is refused, not used. Every state value must be
    what this optimizer keeps with these settings: ``step`` a 0-dim tensor counting at
    most ``steps``, the others finite tensors of their parameter's shape and dtype
    (averages of squares non-negative).

    Args:
        where: the start of the error message (``cannot resume RUN from CKPT``).
        saved: the checkpoint's ``optimizer.state_dict()``.
        optimizer: a fresh optimizer over the model, from the run's settings.
        steps: the optimizer steps the checkpoint says were done.

    Raises:
        GradflowError: one line, ``where: ...``, naming the value and what was expected.
    """
    fresh = optimizer.state_dict()["param_groups"]
    groups = saved["param_groups"]
    if len(groups) != len(fresh) or not all(isinstance(g, dict) for g in groups):
        raise GradflowError(
            f"{where}: its optimizer has {len(groups)} parameter groups, the run's settings "
            f"make {len(fresh)}"
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept: dict[int, frozenset[str]] = {}
    for group, expected, built in zip(groups, fresh, optimizer.param_groups, strict=True):
        if group.get("params") != expected["params"]:
            raise GradflowError(f"{where}: its optimizer's parameter groups do not fit the model")
        for key, value in group.items():
            problem = _setting_problem(key, value, expected)
            if problem:
                raise GradflowError(f"{where}: {problem}")
        kept.update(dict.fromkeys(expected["params"], _state_keys(optimizer, built)))
    for index, state in saved["state"].items():
        if type(index) is not int or not 0 <= index < len(params) or not isinstance(state, dict):
            raise GradflowError(
                f"{where}: its optimizer state is for parameter {index!r}, the model has "
                f"{len(params)}"
            )
        for key, value in state.items():
            problem = _state_problem(key, value, params[index], kept[index], steps)
            if problem:
                raise GradflowError(f"{where}: its optimizer state {problem}")
        if state and set(state) != kept[index]:
            missing = ", ".join(sorted(kept[index] - set(state)))
            raise GradflowError(f"{where}: its optimizer state lacks {missing}")


def _setting_problem(key: Any, value: Any, expected: Mapping[str, Any]) -> str:
    """What is wrong with one saved optimizer setting ("" when nothing)."""
    if key == "params":
        return ""
    if key not in expected:
        return f"unknown optimizer setting {key!r}"
    want = expected[key]
    said = f"its optimizer's {key} is {value!r}"
    if isinstance(want, bool) or want is None:
        return "" if value is want else f"{said}, the run's settings say {want!r}"
    if isinstance(want, int | float):
        if type(value) not in (int, float):
            return f"{said}, not a number"
        positive = key in ("lr", "eps")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            return f"{said}, not a finite {'positive' if positive else 'non-negative'} number"
    elif isinstance(want, tuple):
        if not isinstance(value, tuple | list) or not all(type(v) in (int, float) for v in value):
            return f"{said}, not a tuple of numbers"
        value = tuple(value)
    return "" if value == want else f"{said}, the run's settings say {want!r}"


def _state_keys(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> frozenset[str]:
    """The state ``optimizer`` keeps per parameter with ``group``'s settings: one step of
    the same optimizer on a one-entry parameter shows it."""
    param = torch.zeros(1, requires_grad=True)
    settings = {k: v for k, v in group.items() if k != "params"}
    probe = type(optimizer)([param], **settings)
    param.grad = torch.zeros(1)
    probe.step()
    return frozenset(probe.state[param])


def _state_problem(
    key: Any, value: Any, param: torch.Tensor, kept: frozenset[str], steps: int
) -> str:
    """What is wrong with one saved state value of ``param`` ("" when nothing)."""
    if key not in kept:
        return (
            f"{key} is not one this optimizer keeps with these settings ({', '.join(sorted(kept))})"
        )
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        return (
            f"{key} is {value!r}, not a tensor"
            if key == "step"
            else (f"{key} is a {type(value).__name__}, not a tensor")
        )
    if key == "step":
        if value.dim():
            return f"step is a tensor of {tuple(value.shape)}, not a 0-dim count"
        count = float(value)
        if not (count.is_integer() and 0 <= count <= steps):
            shown = int(count) if count.is_integer() else count
            return f"step is {shown}, not a count of at most the {steps} steps done"
        return ""
    if value.dim() == 0 and param.dim():
        return f"{key} is a 0-dim tensor for a parameter of {tuple(param.shape)}"
    if value.shape != param.shape:
        return f"{key} is {tuple(value.shape)} for a parameter of {tuple(param.shape)}"
    if value.dtype != param.dtype:
        return f"{key} is {value.dtype} for a {param.dtype} parameter"
    if not bool(torch.isfinite(value).all()):
        return f"{key} has non-finite entries"
    if key in NON_NEGATIVE and bool((value < 0).any()):
        return f"{key} has negative entries"
    return ""
