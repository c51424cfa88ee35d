"""The Recorder's arguments: checked with one-line errors, optimizers unwrapped, layers
selected."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gradflow.budget import BudgetSchedule
from gradflow.errors import GradflowError, unknown_name
from gradflow.layers import LayerSpec
from gradflow.probes import PROBES
from gradflow.schedule import Schedule, as_schedule, describe

LayerSelect = Sequence[str] | Callable[[str, nn.Module], bool] | None


def hooked(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a torch optimizer with step hooks (measured through them)."""
    # A wrapper may subclass Optimizer without its step hooks (AcceleratedOptimizer does).
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(
        optimizer, "_optimizer_step_pre_hooks"
    )


def unwrap_optimizer(optimizer: Any) -> Any:
    """What gradflow measures around for ``optimizer``: a torch optimizer, found inside
    wrappers that only pass ``step()`` on and hold it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or the first wrapper on
    the way that holds its optimizer as ``.base`` or has ``step()`` and ``param_groups`` of
    its own (``schedulefree.ScheduleFreeWrapper``): such a wrapper may change the
    parameters outside its inner optimizer's step, so its own ``step()`` is measured."""
    seen: set[int] = set()
    current = optimizer
    while not hooked(current):
        if hasattr(current, "base") or (
            callable(getattr(current, "step", None)) and hasattr(current, "param_groups")
        ):
            return current
        inner = getattr(current, "optimizer", None)
        if inner is None or id(current) in seen:
            raise GradflowError(
                "optimizer must be a torch.optim.Optimizer, an object holding one as "
                ".optimizer or .base, or an object with step() and param_groups, got "
                f"{type(optimizer).__name__}"
            )
        seen.add(id(current))
        current = inner
    return current


def optimizers_of(optimizer: Any) -> list[Any]:
    """The optimizers (or optimizer-like wrappers) measured around, see
    :func:`unwrap_optimizer`; each must have ``param_groups`` and ``step()``."""
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    found = [unwrap_optimizer(item) for item in items]
    for item in found:
        if not (callable(getattr(item, "step", None)) and hasattr(item, "param_groups")):
            raise GradflowError(
                f"{type(item).__name__} has no step() and param_groups to measure around"
            )
    if len({id(o) for o in found}) != len(found):
        raise GradflowError("the same optimizer is given twice")
    return found


def _is_names(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    )


def check_probes(probes: Any) -> tuple[str, ...]:
    names = (probes,) if isinstance(probes, str) else probes
    try:
        chosen = tuple(dict.fromkeys(names))
    except TypeError:
        raise GradflowError(
            f"probes must be a probe name or a list of them, got {probes!r}"
        ) from None
    for probe in chosen:
        if probe not in PROBES:
            raise unknown_name("probe", str(probe), PROBES.names())
    return chosen


def check_arguments(
    *,
    path: Any,
    layers: Any,
    flush_every: Any,
    flush_seconds: Any,
    scaler: Any,
    config: Any,
    write_rank: Any,
    flags: dict[str, Any],
) -> None:
    """One-line errors for arguments of the wrong type or range."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(path, (str, os.PathLike)):
        raise GradflowError(f"path must be a file name, got {type(path).__name__}")
    if not is_int(flush_every) or flush_every < 1:
        raise GradflowError(f"flush_every must be an integer >= 1, got {flush_every!r}")
    if (
        isinstance(flush_seconds, bool)
        or not isinstance(flush_seconds, (int, float))
        or not math.isfinite(flush_seconds)
        or flush_seconds <= 0
    ):
        raise GradflowError(f"flush_seconds must be a finite number > 0, got {flush_seconds!r}")
    if scaler is not None and not callable(getattr(scaler, "step", None)):
        raise GradflowError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if config is not None and not isinstance(config, dict):
        raise GradflowError(f"config must be a dict, got {type(config).__name__}")
    if not is_int(write_rank) or write_rank < 0:
        raise GradflowError(f"write_rank must be an integer >= 0, got {write_rank!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise GradflowError(f"{name} must be True or False, got {value!r}")
    if layers is not None and not (callable(layers) or _is_names(layers)):
        raise GradflowError(
            "layers must be a name prefix, a list of them, or a (name, module) -> bool "
            f"predicate, got {type(layers).__name__}"
        )


def choose_schedule(
    every: int | Schedule | None, budget: float | BudgetSchedule | None
) -> tuple[Schedule, BudgetSchedule | None, str]:
    """The recorded steps' schedule, from ``every`` or ``budget`` (one of them at most).

    Args:
        every: an int ``n``, a ``step -> bool`` callable, or None (every step).
        budget: a share of the wall time, a :class:`BudgetSchedule`, or None.

    Returns:
        The schedule, the budget schedule when there is one, and a description of the
        schedule for the run file (``"every 5"``, ``"budget 0.02"``, see
        :func:`~gradflow.schedule.describe`).
    """
    if budget is not None and every is not None:
        raise GradflowError("every and budget exclude each other: give one of them")
    if budget is not None:
        chosen = budget if isinstance(budget, BudgetSchedule) else BudgetSchedule(budget)
        per_epoch = chosen.steps_per_epoch
        return (
            chosen,
            chosen,
            f"budget {chosen.budget:g}" + (f", {per_epoch} steps per epoch" if per_epoch else ""),
        )
    schedule = as_schedule(every)
    return schedule, None, describe(schedule)


def writing_role(write_rank: int, reduce_activations: bool) -> tuple[int, int, bool, bool]:
    """This process's part under ``torch.distributed`` (rank 0 of 1 without it).

    Args:
        write_rank: the rank that writes the run file.
        reduce_activations: whether activation reductions are summed over the ranks.

    Returns:
        ``(rank, world_size, writes, reduce_activations)``, the last False on one rank.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1
    if write_rank >= world_size:
        raise GradflowError(f"write_rank {write_rank} is not a rank of {world_size}")
    return rank, world_size, rank == write_rank, reduce_activations and world_size > 1


def logged_values(scalars: dict[str, Any]) -> dict[str, torch.Tensor | float]:
    """The values given to ``log()``: one-element tensors (detached, not synced) or floats.

    Args:
        scalars: name -> a number or a one-element tensor.

    Returns:
        name -> a 0-d tensor or a float.
    """
    values: dict[str, torch.Tensor | float] = {}
    for name, value in scalars.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise GradflowError(
                    f"log({name}=...) needs a scalar, got shape {tuple(value.shape)}"
                )
            values[name] = value.detach().reshape(())
        else:
            values[name] = float(value)
    return values


def split_scalars(values: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Device tensors stay tensors (no sync); CPU tensors and numbers become floats."""
    device: dict[str, torch.Tensor] = {}
    host: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            device[name] = value.detach()
        else:
            host[name] = float(value)
    return device, host


def recorded_layers(layers: list[LayerSpec], select: LayerSelect) -> list[LayerSpec]:
    if select is None:
        chosen = layers
    elif callable(select):
        chosen = [lay for lay in layers if select(lay.name, lay.module)]
    else:
        prefixes = [select] if isinstance(select, str) else list(select)
        chosen = [
            lay
            for lay in layers
            if any(lay.name == p or lay.name.startswith(p + ".") for p in prefixes)
        ]
    if not any(lay.params for lay in chosen):
        raise GradflowError(
            "no layer to record: the model has no module owning trainable parameters"
            if select is None
            else f"layer selection {select!r} matches no layer with trainable parameters"
        )
    for i, lay in enumerate(chosen):
        lay.reg_index = i
    return chosen
