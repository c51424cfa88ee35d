"""The settings of a training run (:class:`TrainConfig`), importable without torch.

``gradflow record`` parses and validates its options before torch is imported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from gradflow.errors import GradflowError, unknown_name
from gradflow.names import BUILTIN_PROBES, DEFAULT_PROBES

# The names registered in gradflow.em.metrics.LOSSES, listed here so that validating a
# configuration does not import torch (a test keeps the two in step).
LOSS_NAMES = ("dice", "bce")

OnNonfinite = Literal["stop", "continue"]
OptimizerName = Literal["rmsprop", "sgd", "adam"]
Init = Literal["default", "paper"]
N_VAL = 5  # the paper's split: the last 5 of the 30 ISBI slices validate
# What shapes the trajectory: a resumed run must agree on all of it (epochs may grow).
RESUME_KEYS = (
    "model",
    "model_overrides",
    "data",
    "synthetic_slices",
    "synthetic_size",
    "steps_per_epoch",
    "crop",
    "batch_size",
    "lr",
    "rho",
    "eps",
    "weight_decay",
    "optimizer",
    "momentum",
    "nesterov",
    "init",
    "seed",
    "loss",
    "augment",
    "every",
    "budget",
    "probes",
)
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
# torch.manual_seed takes seeds up to 2**64 - 1; 2**63 - 1 also fits every signed 64-bit
# store of the seed (HDF5 and numpy integers).
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; the defaults make a CPU run of a few minutes.

    - model: ``model``, a zoo name (``gradflow models``), with ``model_overrides`` of its
      :class:`~gradflow.em.models.FCNConfig` fields (e.g. ``{"batch_norm": False}``).
    - data: ``data``, an ISBI 2012 folder or ``"synthetic"`` (``synthetic_slices`` slices of
      ``synthetic_size`` px, always generated from seed 0: one fixed data set, like a real
      one); the last 5 slices validate, the others train.
    - training: ``epochs`` x ``steps_per_epoch`` optimizer steps on batches of ``batch_size``
      random ``crop`` px crops (``augment``: flips, rotations, shear); ``loss`` "dice" or
      "bce"; L2 ``weight_decay`` on convolution weights only; ``seed``; ``device`` "cpu",
      "cuda" or "cuda:N".
    - optimizer: ``optimizer`` "rmsprop" (the paper's: ``lr``, ``rho`` as torch's ``alpha``,
      ``eps``, ``momentum``), "sgd" (``lr``, ``momentum``, Nesterov's when ``nesterov``) or
      "adam" (``lr``, ``eps``, ``momentum`` as beta1, beta2 0.999); ``momentum`` None is the
      optimizer's usual value (:attr:`momentum_value`: 0 for RMSprop, 0.9 for SGD and Adam).
    - init: ``init`` "default" (the zoo's: He normal, zero-initialised residual branches,
      classifier bias at the foreground prior) or "paper" (the authors' Keras ``he_normal``
      on every convolution, zero biases; see :func:`gradflow.em.models.paper_init`).
    - validation: after every ``val_every``-th epoch (default 1: every epoch; 0: never;
      the metrics are NaN in other epochs) on the first ``val_slices`` validation slices
      (default None: all 5).
    - recording: record every ``every``-th step (default 1), or the steps an overhead
      ``budget`` affords (see :mod:`gradflow.budget`), with ``probes`` (default: all);
      the run file is flushed every ``flush_every`` rows or ``flush_seconds`` seconds;
      ``on_nonfinite``: "stop" after the first step with a non-finite value, or "continue".
    - ``log_every``: steps between progress lines; ``command``: the command line, stored in
      the run file.
    """

    model: str = "fig3a-long-short-9"
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    data: str = "synthetic"
    synthetic_slices: int = 30
    synthetic_size: int = 512
    epochs: int = 20
    steps_per_epoch: int = 20
    crop: int = 96
    batch_size: int = 4
    lr: float = 1e-3
    rho: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 1e-4
    optimizer: OptimizerName = "rmsprop"
    momentum: float | None = None
    nesterov: bool = True
    init: Init = "default"
    seed: int = 0
    device: str = "cpu"
    loss: str = "dice"
    augment: bool = True
    val_every: int = 1
    val_slices: int | None = None
    every: int = 1
    budget: float | None = None
    probes: tuple[str, ...] = DEFAULT_PROBES
    flush_every: int = 100
    flush_seconds: float = 5.0
    on_nonfinite: OnNonfinite = "stop"
    log_every: int = 10
    command: str | None = None

    def validate(self) -> None:
        """Raise one clear :class:`GradflowError` for the first bad setting."""
        at_least = {
            "epochs": 1,
            "steps_per_epoch": 1,
            "batch_size": 1,
            "crop": 1,
            "synthetic_slices": N_VAL + 1,
            "synthetic_size": 1,
            "seed": 0,
            "val_every": 0,
            "every": 1,
            "flush_every": 1,
            "log_every": 1,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if value < low:
                raise GradflowError(f"{name} must be at least {low}, got {value}")
        if self.seed > MAX_SEED:
            raise GradflowError(f"seed must be at most 2**63 - 1 = {MAX_SEED}, got {self.seed}")
        if self.budget is not None and not 0 < self.budget < 1:
            raise GradflowError(f"budget must be between 0 and 1, got {self.budget}")
        if self.budget is not None and self.every != 1:
            raise GradflowError("every and budget exclude each other: give one of them")
        if self.val_slices is not None and not 1 <= self.val_slices <= N_VAL:
            raise GradflowError(f"val_slices must be 1 to {N_VAL}, got {self.val_slices}")
        for name in ("lr", "eps", "flush_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise GradflowError(f"{name} must be a positive number, got {value}")
        if not 0 <= self.rho < 1 or not self.weight_decay >= 0:
            raise GradflowError(
                f"need 0 <= rho < 1 and weight_decay >= 0, got {self.rho} and {self.weight_decay}"
            )
        if self.loss not in LOSS_NAMES:
            raise unknown_name("loss", self.loss, LOSS_NAMES)
        for name, choices in (("optimizer", OptimizerName), ("init", Init)):
            if getattr(self, name) not in get_args(choices):
                raise unknown_name(name, getattr(self, name), get_args(choices))
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise GradflowError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.on_nonfinite not in get_args(OnNonfinite):
            raise unknown_name("on_nonfinite choice", self.on_nonfinite, get_args(OnNonfinite))
        unknown = [probe for probe in self.probes if probe not in BUILTIN_PROBES]
        if unknown:  # plug-ins registered in this process (the registry imports torch)
            from gradflow.probes import PROBES

            for probe in unknown:
                if probe not in PROBES:
                    raise unknown_name("probe", probe, PROBES.names())
        if not _DEVICE.fullmatch(self.device):
            raise GradflowError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def momentum_value(self) -> float:
        """``momentum``, or the optimizer's usual value when None: 0 for RMSprop (the
        paper's), 0.9 for SGD (the authors' alternative, with Nesterov) and for Adam."""
        if self.momentum is not None:
            return self.momentum
        return 0.0 if self.optimizer == "rmsprop" else 0.9
