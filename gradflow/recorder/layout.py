"""The Recorder's layer layout: the recorded layers in forward order, the probes attached
to their parameters, and re-deriving both when the model's parameters change."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.kernels import kernel_backend
from gradflow.layers import LayerSpec, discover_layers, order_by_first_call
from gradflow.probes import Attachment, Block, CallLog, LayerMap, ParamReductions, Snapshot
from gradflow.probes.snapshot import local
from gradflow.recorder.base import RecorderBase
from gradflow.recorder.options import LayerSelect, recorded_layers
from gradflow.runfile import Event
from gradflow.writer import Relayout, RunLayout


class LayoutMixin(RecorderBase):
    """The recorded layers, their order and parameters, and the probes attached to them."""

    def _init_layout(self, model: nn.Module, layers: LayerSelect) -> None:
        self._select = layers
        self._layers = recorded_layers(discover_layers(model), layers)
        self._grads_at_attach = {
            id(p): (weakref.ref(p.grad), p.grad._version)
            for lay in self._layers
            for p in lay.params
            if p.grad is not None
        }
        self._layout_sent = False
        self._signature: list[tuple[Any, ...]] = []
        self._reg_to_layer = np.zeros(0, np.int64)
        self._epoch_snapshot: Snapshot | None = None
        self._epoch_probe: ParamReductions | None = None
        self._epoch_w_sq: torch.Tensor | None = None
        self._epoch_stale = False
        self._call_order = {}
        self._n_groups: list[int] = []

    def _ensure_layout(self) -> None:
        if self._layout_sent:
            return
        if self._writes and self._resume is None and not self._overwrite and self.path.exists():
            raise GradflowError(
                f"{self.path}: file exists; pass overwrite=True to replace it, "
                "or load_state_dict() before the first step to continue it"
            )
        self._layout_sent = True
        for handle in self._order_handles:
            handle.remove()
        self._order_handles = []
        layers = order_by_first_call(self._layers, self._call_order)
        self._layers = layers
        reg_to_layer = np.empty(len(layers), dtype=np.int64)
        for index, lay in enumerate(layers):
            reg_to_layer[lay.reg_index] = index
        self._reg_to_layer = reg_to_layer
        self._build_probes()
        params = [p for lay in layers for p in lay.params]
        device = str(local(params[0]).device) if params else "cpu"
        self._writer.put(
            RunLayout(
                path=self.path,
                layers=[lay.info(i) for i, lay in enumerate(layers)],
                probes=self.probes,
                map=LayerMap.of(layers, reg_to_layer),
                config=self._config,
                attrs={
                    "device": device,
                    "kernel_backend": kernel_backend(torch.device(device)),
                    "flush_every": self._flush[0],
                    "flush_seconds": self._flush[1],
                    "optimizer": ",".join(type(o).__name__ for o in self._optimizers),
                    "world_size": self.world_size,
                    "schedule": self._schedule_desc,
                    "recorded_probes": list(self.probes),
                    **(
                        {"budget": self._budget.budget, "budget_reached": float("nan")}
                        if self._budget is not None
                        else {}
                    ),
                    "activation_scope": "all ranks"
                    if self._reduce_activations
                    else f"rank {self.rank} local batch",
                },
                overwrite=self._overwrite,
                resume_at=self._resume,
            )
        )
        if self._resume is not None:
            self._writer.put(
                Event(self.step, self.epoch, 0.0, "resume", detail=f"resumed at step {self.step}")
            )
        # The file exists, with its layers, before the first row: a process killed before
        # the first flush leaves a readable run file.
        self._wait_for_writer("creating" if self._resume is None else "resuming")

    def _attachment(self) -> Attachment:
        """The current layers, each parameter's optimizer (the first holding it, or the
        first optimizer) and the call log, for the probes."""
        owner: dict[int, int] = {}
        for index, opt in enumerate(self._optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    owner.setdefault(id(p), index)
        owners = [owner.get(id(p), 0) for lay in self._layers for p in lay.params]
        return Attachment(self._layers, owners, self._current_log, self.model)

    def _current_log(self) -> CallLog:
        return self._log

    def _build_probes(self) -> None:
        """Attach the step probes (and the epoch's snapshot) to the current layers, whose
        parameter layout the run file's rows follow from here on."""
        attachment = self._attachment()
        for probe in self._step_probes:
            probe.attach(attachment)
        self._n_groups = [len(opt.param_groups) for opt in self._optimizers]
        self._signature = _signature(self._layers)
        if self._epoch_stats:
            epoch = self._epoch_probe = ParamReductions(self._layers, attachment.owners)
            self._epoch_snapshot = Snapshot(epoch.params, epoch.device)
            self._epoch_w_sq = self._epoch_snapshot.take()

    def _check_layout(self, always: bool = False) -> None:
        """Re-derive the layers' parameters if any changed (on recorded steps, or
        ``always``)."""
        if self._layout_sent and (self._active or always) and self._layout_changed():
            self._rederive()

    def _layout_changed(self) -> bool:
        return (
            self._rows.dirty
            or [len(opt.param_groups) for opt in self._optimizers] != self._n_groups
            or _signature(self._layers) != self._signature
        )

    def _rederive(self) -> None:
        self._finalize_row()  # written with the layout it was measured with
        self._rows.dirty = False
        known, self._module_ids = self._module_ids, {id(m) for m in self.model.modules()}
        old = {lay.name: lay for lay in self._layers}
        try:
            found = recorded_layers(discover_layers(self.model), self._select)
        except GradflowError:
            found = []
        new = {lay.name: lay for lay in found if lay.name in old or id(lay.module) not in known}
        if set(new) != set(old):
            added = ", ".join(sorted(set(new) - set(old))) or "none"
            gone = ", ".join(sorted(set(old) - set(new))) or "none"
            raise GradflowError(
                f"{self.path}: the model's recorded layers changed (new: {added}; gone: {gone}) "
                "but a run file's layers are fixed: record the changed model into a new run file"
            )
        for lay in new.values():
            lay.reg_index, lay.depth = old[lay.name].reg_index, old[lay.name].depth
        self._layers = [new[lay.name] for lay in self._layers]
        self._hook_layers()
        self._build_probes()
        self._writer.put(Relayout(LayerMap.of(self._layers, self._reg_to_layer)))
        self._epoch_stale = True

    def _epoch_update(self) -> tuple[list[torch.Tensor], Block | None]:
        """The epoch's update reductions, packed, and their block (none without a snapshot,
        or where the parameters were re-derived within the epoch); a new snapshot."""
        parts: list[torch.Tensor] = []
        block = None
        if self._epoch_snapshot is not None and self._epoch_w_sq is not None:
            if not self._epoch_stale:  # parameters re-derived within the epoch: no update
                w_sq = self._epoch_w_sq
                zeros = torch.zeros_like(w_sq)
                vec = torch.cat([w_sq, zeros, zeros, *self._epoch_snapshot.delta()])
                parts = [self._epoch_probe.complete(vec) if self._epoch_probe else vec]
                block = Block(vec.numel())
            self._epoch_w_sq = self._epoch_snapshot.take()
            self._epoch_stale = False
        return parts, block


def _signature(layers: Sequence[LayerSpec]) -> list[tuple[Any, ...]]:
    """Shape, dtype, device and ``requires_grad`` of every parameter of the layers: a change
    (one frozen or unfrozen) means new probes."""
    return [
        (p.shape, p.dtype, p.device, p.requires_grad)
        for lay in layers
        for p in (lay.owned or lay.params)
    ]
