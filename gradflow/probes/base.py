"""The probe protocol: what every probe declares and does, and the registry of probes.

A probe measures one kind of tensor during training, as float64 *reductions* in named
columns (never statistics, never a host sync), and says how a packed row of them turns
into per-layer reductions on the host, from which :mod:`gradflow.statistics` computes the
run file's statistics. The recorder loops over the probes it was given; the writer reads
the registry: neither names a probe.

Two scopes:

- ``"step"``: measured around each optimizer step (:meth:`Probe.before_step`,
  :meth:`Probe.after_step`), packed once per row (:meth:`Probe.pack`);
- ``"call"``: measured at each layer call (:meth:`Probe.on_output`), one row of columns per
  call in a :class:`~gradflow.probes.calls.CallLog`, which the recorder packs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from gradflow.layers import LayerSpec
from gradflow.registry import Registry

if TYPE_CHECKING:
    from gradflow.probes.calls import CallLog


@dataclass(frozen=True)
class Block:
    """Where one probe's reductions sit in a packed row, and what unpacking them needs."""

    size: int  # float64 entries in the packed row
    key: Hashable = None  # rows whose blocks have equal keys are unpacked together
    counts: tuple[int, ...] = ()  # per-row numbers unpacking needs (elements per call)


@dataclass(frozen=True)
class LayerMap:
    """How packed vectors map onto the run file's layers."""

    n_layers: int
    reg_to_layer: np.ndarray  # a layer's registration index -> its column (forward order)
    layer_starts: np.ndarray  # index of each layer's first parameter tensor
    layer_numel: np.ndarray  # trainable elements per layer

    @classmethod
    def of(cls, layers: Sequence[LayerSpec], reg_to_layer: np.ndarray) -> LayerMap:
        """The map of ``layers`` (in forward order) and their parameters."""
        counts = [len(lay.params) for lay in layers]
        return cls(
            n_layers=len(layers),
            reg_to_layer=reg_to_layer,
            layer_starts=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
            layer_numel=np.array([lay.n_params for lay in layers], dtype=np.float64),
        )


@dataclass(frozen=True)
class Check:
    """Layers where a probe saw non-finite values in one row (see :meth:`Probe.nonfinite`)."""

    order: int  # when in a step this is measured: the first non-finite value is reported
    what: str  # e.g. "output gradient"
    bad: np.ndarray  # [L] bool
    last_first: bool = False  # measured in backward: the last layer comes first


@dataclass
class Attachment:
    """What a probe measures: the recorded layers and how to reach the recorder's state."""

    layers: Sequence[LayerSpec]
    # The optimizer of each parameter tensor, in layer order (None: all the first one's)
    owners: Sequence[int] | None = None
    current_log: Callable[[], CallLog] | None = None  # the layer calls being logged
    model: torch.nn.Module | None = None  # the recorded model, for probes of its structure


class Probe:
    """A probe (see the module docstring). Subclasses set :attr:`name`, :attr:`scope` and
    :attr:`columns` and implement the methods of their scope and :meth:`unpack`."""

    name: ClassVar[str]
    scope: ClassVar[str]  # "step" or "call"
    columns: ClassVar[tuple[str, ...]]  # the reductions, in packed order
    # Columns proportional to a power of the loss scale (AMP GradScaler): divided by
    # scale**power on the host, so that they are those of the unscaled loss.
    loss_scaled: ClassVar[Mapping[str, int]] = {}

    def attach(self, attachment: Attachment) -> None:
        """Start measuring ``attachment.layers`` (called again when the model's parameters
        change)."""

    def detach(self) -> None:
        """Stop measuring and drop what was measured."""

    # -- scope "step" --------------------------------------------------------------------------
    def before_step(self, group: int) -> None:
        """Optimizer ``group`` is about to step (its gradients and weights are final)."""

    def after_step(self, group: int, stepped: bool, has_update: bool) -> None:
        """Optimizer ``group`` stepped (``stepped`` False: skipped; ``has_update`` False: no
        optimizer step is measured at all, only a backward pass)."""

    def pack(self) -> tuple[torch.Tensor, Block] | None:
        """This row's reductions as one float64 vector (on the device) and its block, or
        ``None`` if nothing was measured."""
        return None

    # -- scope "call" --------------------------------------------------------------------------
    def on_output(self, out: torch.Tensor, log: CallLog, layer_id: int, forward: bool) -> None:
        """A recorded layer call returned ``out`` (``forward`` False: recomputed during
        backward, under activation checkpointing)."""

    def new_row(self) -> None:
        """The layer calls logged so far belong to a closed row."""

    def collect(self, log: CallLog) -> None:
        """Move the calls measured outside Python since the last collect (by native hooks)
        into ``log``, which the recorder is about to retire."""

    # -- on the host (the writer thread) --------------------------------------------------------
    @classmethod
    def unpack(
        cls, packed: np.ndarray, blocks: Sequence[Block], layers: LayerMap
    ) -> dict[str, np.ndarray]:
        """Per-layer reductions ``[R, L]`` (:attr:`columns` and ``n``) from ``R`` rows of
        this probe's packed blocks ``[R, size]`` (NaN for layers it did not measure)."""
        raise NotImplementedError

    @classmethod
    def nonfinite(cls, reductions: Mapping[str, np.ndarray]) -> list[Check]:
        """Where one row's per-layer reductions ``[1, L]`` show non-finite values."""
        return []


PROBES: Registry[type[Probe]] = Registry("probe", package="gradflow.probes")


def register(cls: type[Probe]) -> type[Probe]:
    """Class decorator: register a probe under its :attr:`~Probe.name`."""
    PROBES.register(cls.name)(cls)
    return cls
