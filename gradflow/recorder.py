"""The Recorder: hooks a model and its optimizer and streams per-layer statistics to a run file."""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradflow.errors import GradflowError, reason, unknown_name
from gradflow.probes import (
    ActivationProbe,
    CallLog,
    HostReducer,
    LayerSpec,
    ParamProbe,
    Snapshot,
    discover_layers,
    first_tensor,
    grad_output_hook,
    order_by_first_call,
)
from gradflow.schedule import Schedule, as_schedule
from gradflow.store import Event, check_writable
from gradflow.writer import STEP_PROBES, EpochItem, Layout, NullWriter, StepItem, WriterThread

_OPEN: weakref.WeakKeyDictionary[nn.Module, Recorder] = weakref.WeakKeyDictionary()
LayerSelect = Sequence[str] | Callable[[str, nn.Module], bool] | None


class Recorder:
    """Record per-layer gradient, update, activation and output-gradient statistics.

    Use as a context manager (or call :meth:`close`)::

        with gradflow.Recorder(model, optimizer, "run.h5") as rec:
            for x, y in loader:
                optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward()
                optimizer.step()
                rec.log(loss=loss)
            rec.epoch_end(val_loss=...)

    Each ``optimizer.step()`` is one row, measured through optimizer step hooks: gradients
    after accumulation, all-reduce and AMP unscaling, the update around the real step.
    With ``optimizer=None`` every backward pass is a row instead (no update statistics).

    Args:
        model: the module to watch (a DDP wrapper is unwrapped).
        optimizer: its optimizer, or None.
        path: the run file to write.
        every: which steps to record: an int ``n`` (every n-th step) or ``step -> bool``.
        probes: any of ``"param"``, ``"activation"``, ``"grad_output"``.
        layers: name prefixes or a ``(name, module) -> bool`` predicate selecting layers.
        scaler: a ``torch.amp.GradScaler`` in use (records scale and skipped steps).
        flush_every: rows between flushes to disk; ``flush_seconds``: seconds between them.
        config: JSON-able description of the run, stored in the file.
        overwrite: replace an existing file (default: refuse).
        epoch_stats: record the per-epoch update ``|W_end - W_start|`` at :meth:`epoch_end`
            (keeps one more float32 copy of the parameters).
        resume: ``(step, epoch)`` to continue an existing run file from (rows at or after
            ``step`` and epochs from ``epoch`` on are dropped, then appended anew).
        write_rank: under ``torch.distributed``, the one rank that writes the file. Other
            ranks write nothing; they only join the collectives that sharded (DTensor/FSDP2)
            parameters or ``reduce_activations`` need, and are otherwise inert.
        reduce_activations: under ``torch.distributed``, sum activation and output-gradient
            reductions over all ranks (their whole global batch) instead of using the
            writing rank's local batch (the default). The file's ``activation_scope`` says which.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        path: str | os.PathLike[str] = "run.h5",
        *,
        every: int | Schedule | None = None,
        probes: Iterable[str] = STEP_PROBES,
        layers: LayerSelect = None,
        scaler: Any = None,
        flush_every: int = 100,
        flush_seconds: float = 5.0,
        config: dict[str, Any] | None = None,
        overwrite: bool = False,
        epoch_stats: bool = True,
        resume: tuple[int, int] | None = None,
        write_rank: int = 0,
        reduce_activations: bool = False,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not isinstance(model, nn.Module):
            raise GradflowError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.probes = tuple(dict.fromkeys(probes))
        for probe in self.probes:
            if probe not in STEP_PROBES:
                raise unknown_name("probe", probe, STEP_PROBES)
        if flush_every < 1 or flush_seconds <= 0:
            raise GradflowError("flush_every must be >= 1 and flush_seconds > 0")
        self.path = Path(path)
        if model in _OPEN:
            other: Recorder = _OPEN[model]
            raise GradflowError(
                f"this model already has an open Recorder writing {other.path}; "
                "close it first (rec.close() or leave its with-block)"
            )
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if distributed else 0
        self.world_size = torch.distributed.get_world_size() if distributed else 1
        self._writes = self.rank == write_rank
        self._reduce_activations = reduce_activations and self.world_size > 1
        # gradflow's own collectives run in a group of their own, apart from the model's.
        self._group = torch.distributed.new_group() if self._reduce_activations else None
        if self._writes and resume is None:
            check_writable(self.path, overwrite=overwrite)
        elif self._writes and not self.path.exists():
            raise GradflowError(f"{self.path}: cannot resume, no such run file")
        self.model = model
        self.optimizer = optimizer
        self.schedule = as_schedule(every)
        self.step, self.epoch = resume if resume is not None else (0, 0)
        self._resume = resume
        self._config = dict(config or {})
        self._overwrite = overwrite
        self._epoch_stats = epoch_stats
        self._flush = (flush_every, flush_seconds)

        self._layers = _select(discover_layers(model), layers)
        self._layout_sent = False
        self._param_probe: ParamProbe | None = None
        self._epoch_snapshot: Snapshot | None = None
        self._epoch_probe: ParamProbe | None = None
        self._epoch_w_sq: torch.Tensor | None = None
        self._call_order: dict[str, int] = {}
        self._active = self.schedule(self.step)
        self._log = CallLog()
        self._host = HostReducer()
        self._activation = ActivationProbe(self._host) if "activation" in self.probes else None
        self._gout_hooks: list[Callable[[torch.Tensor], None]] = []
        self._next_scalars: dict[str, Any] = {}
        self._open_row: dict[str, Any] | None = None
        self._stepped = False
        self._hook_s = 0.0
        self._stats_s = 0.0
        self._t0 = time.perf_counter()
        self._handles: list[Any] = []
        self._order_handles: list[Any] = []
        self._scaler = scaler
        self._scaler_step: Any = None
        self._closed = False

        sharded = any(hasattr(p, "device_mesh") for lay in self._layers for p in lay.params)
        # A rank that neither writes nor joins collectives has nothing to do: no hooks at all.
        self._inert = not self._writes and not (sharded or self._reduce_activations)
        self._writer: WriterThread | NullWriter = (
            WriterThread(flush_every, flush_seconds) if self._writes else NullWriter()
        )
        self._writer.start()
        _OPEN[model] = self
        try:
            if not self._inert:
                self._attach()
        except BaseException:
            self._detach()
            self._writer.finish()
            _OPEN.pop(model, None)
            raise
        atexit.register(self._atexit)

    # -- public API ------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """Names of the recorded layers (forward order once the first forward ran)."""
        return [lay.name for lay in self._layers]

    @property
    def first_nonfinite(self) -> Event | None:
        """The first non-finite event seen so far (set by the writer thread, may lag a step)."""
        return self._writer.first_nonfinite

    def log(self, **scalars: float | torch.Tensor) -> None:
        """Attach scalars (e.g. ``loss=loss``) to the current step; tensors are not synced."""
        if self._closed:
            raise GradflowError("log() on a closed Recorder")
        if self._inert:
            return
        values = {}
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise GradflowError(
                        f"log({name}=...) needs a scalar, got shape {tuple(value.shape)}"
                    )
                value = value.detach().reshape(())
            else:
                value = float(value)
            values[name] = value
        if self._open_row is not None:
            self._open_row["scalars"].update(values)
        elif self._active:
            self._next_scalars.update(values)

    def epoch_end(self, **metrics: float | torch.Tensor) -> None:
        """Close the current epoch: store its update statistics and the given metrics."""
        if self._closed:
            raise GradflowError("epoch_end() on a closed Recorder")
        if self._inert:
            self.epoch += 1
            return
        self._ensure_layout()
        self._finalize_row()
        device_vals, host_vals = _split_scalars(metrics)
        parts: list[torch.Tensor] = []
        if self._epoch_snapshot is not None and self._epoch_w_sq is not None:
            w_sq = self._epoch_w_sq
            zeros = torch.zeros_like(w_sq)
            vec = torch.cat([w_sq, zeros, zeros, *self._epoch_snapshot.delta()])
            parts = [self._epoch_probe.complete(vec) if self._epoch_probe else vec]
            self._epoch_w_sq = self._epoch_snapshot.take()
        packed, ready = self._to_host(parts, device_vals)
        self._writer.put(
            EpochItem(
                epoch=self.epoch,
                end_step=self.step,
                time=time.perf_counter() - self._t0,
                packed=packed,
                ready=ready,
                metric_names=list(device_vals),
                host_metrics=host_vals,
                has_update=bool(parts),
            )
        )
        self.epoch += 1

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything recorded so far is committed to the run file
        (e.g. before saving a checkpoint that a resumed run will continue from)."""
        if self._closed or self._inert:
            return
        self._ensure_layout()
        done = threading.Event()
        self._writer.put(done)
        deadline = time.monotonic() + timeout
        # A writer that failed may be busy closing its file: its error ends the wait.
        while not done.wait(0.05) and self._writer.error is None:
            if time.monotonic() > deadline:
                break
        if not done.is_set() or self._writer.error is not None:
            why = reason(self._writer.error) if self._writer.error else "timed out"
            raise GradflowError(f"{self.path}: flushing the run file failed: {why}")

    def close(self) -> None:
        """Write what is pending, remove every hook, close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._inert:
                self._ensure_layout()
                self._finalize_row()
        finally:
            self._detach()
            _OPEN.pop(self.model, None)
            atexit.unregister(self._atexit)
            self._writer.finish()
        if self._writer.error is not None:
            raise GradflowError(
                f"{self.path}: writing the run file failed: {reason(self._writer.error)}"
            ) from self._writer.error

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(GradflowError):  # keep the body's exception
            self.close()

    def _atexit(self) -> None:
        with contextlib.suppress(GradflowError):
            self.close()

    # -- hooks -------------------------------------------------------------------------------------
    def _attach(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_root_pre))
        self._handles.append(model.register_forward_hook(self._on_root_post))
        if "grad_output" in self.probes:
            self._gout_hooks = [
                grad_output_hook(self._current_log, lay.reg_index, self._host)
                for lay in self._layers
            ]
        if {"activation", "grad_output"} & set(self.probes):
            for lay in self._layers:
                self._handles.append(
                    lay.module.register_forward_hook(partial(self._on_layer_output, lay.reg_index))
                )
        for name, module in model.named_modules():
            self._order_handles.append(
                module.register_forward_pre_hook(partial(self._note_call, name))
            )
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_step_pre))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_step_post))
        if self._scaler is not None:
            self._wrap_scaler()

    def _detach(self) -> None:
        for handle in self._handles + self._order_handles:
            handle.remove()
        self._handles, self._order_handles = [], []
        if self._scaler_step is not None:
            del self._scaler.step
            self._scaler_step = None

    def _note_call(self, name: str, module: nn.Module, args: Any) -> None:
        if module.training:
            self._call_order.setdefault(name, len(self._call_order))

    def _on_root_pre(self, module: nn.Module, args: Any) -> None:
        if self._open_row is not None:
            self._finalize_row()

    def _on_root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        if not self._layout_sent:
            self._ensure_layout()
        if self.optimizer is None and self._active:
            out = first_tensor(output)
            if out is not None and out.requires_grad:
                out.register_hook(self._queue_backward_end)

    def _on_layer_output(self, layer_id: int, module: nn.Module, args: Any, output: Any) -> None:
        if not (self._active and module.training):
            return
        t0 = time.perf_counter()
        out = first_tensor(output)
        if out is not None:
            if self._activation is not None:
                self._activation(out, self._log, layer_id)
            if self._gout_hooks and out.requires_grad:
                out.register_hook(self._gout_hooks[layer_id])
        self._hook_s += time.perf_counter() - t0

    def _current_log(self) -> CallLog:
        return self._log

    def _queue_backward_end(self, grad: torch.Tensor) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._ensure_layout()
        t0 = time.perf_counter()
        probe = self._param_probe
        if probe is not None:
            probe.before_step()
        self._stats_s += time.perf_counter() - t0
        self._close_step(stepped=False, has_update=False)

    def _on_step_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._ensure_layout()
        if self._open_row is not None:
            self._finalize_row()
        self._stepped = True
        if self._active and self._param_probe is not None:
            t0 = time.perf_counter()
            self._param_probe.before_step()
            self._stats_s += time.perf_counter() - t0

    def _on_step_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._close_step(stepped=True, has_update=True)

    def _wrap_scaler(self) -> None:
        scaler = self._scaler
        original = scaler.step

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            self._stepped = False
            scale = getattr(scaler, "_scale", None)
            scale = scale.detach().clone().reshape(()) if isinstance(scale, torch.Tensor) else None
            out = original(optimizer, *args, **kwargs)
            if not self._stepped:  # the scaler found inf/NaN and skipped optimizer.step()
                self._ensure_layout()
                if self._active and self._param_probe is not None:
                    t0 = time.perf_counter()
                    self._param_probe.before_step()
                    self._stats_s += time.perf_counter() - t0
                self._close_step(stepped=False, has_update=True, skipped=True)
            if scale is not None and self._open_row is not None:
                self._open_row["scalars"]["scale"] = scale
            return out

        scaler.step = step
        self._scaler_step = step

    # -- rows ---------------------------------------------------------------------------
    def _close_step(self, *, stepped: bool, has_update: bool, skipped: bool = False) -> None:
        if self._active:
            t0 = time.perf_counter()
            probe = self._param_probe
            param = probe.after_step(stepped) if probe is not None else None
            self._stats_s += time.perf_counter() - t0
            self._open_row = {
                "step": self.step,
                "epoch": self.epoch,
                "time": time.perf_counter() - self._t0,
                "param": param,
                "log": self._log.all_reduce(self.world_size, self._group)
                if self._reduce_activations
                else self._log,
                "scalars": self._next_scalars,
                "skipped": skipped,
                "has_update": has_update,
            }
        self._log = CallLog()
        self._next_scalars = {}
        self.step += 1
        self._active = self.schedule(self.step)

    def _finalize_row(self) -> None:
        row, self._open_row = self._open_row, None
        if row is None:
            return
        t0 = time.perf_counter()
        log: CallLog = row["log"]
        device_vals, host_vals = _split_scalars(row["scalars"])
        parts = ([row["param"]] if row["param"] is not None else []) + log.tensors()
        packed, ready = self._to_host(parts, device_vals)
        copy_s = time.perf_counter() - t0
        self._writer.put(
            StepItem(
                step=row["step"],
                epoch=row["epoch"],
                time=row["time"],
                packed=packed,
                ready=ready,
                has_param=row["param"] is not None,
                act_ids=log.act_ids,
                act_n=log.act_n,
                gout_ids=log.gout_ids,
                gout_n=log.gout_n,
                scalar_names=list(device_vals),
                host_scalars=host_vals,
                skipped=row["skipped"],
                has_update=row["has_update"],
                overhead=[self._hook_s + log.hook_s, self._stats_s, copy_s],
            )
        )
        self._hook_s = self._stats_s = 0.0

    def _to_host(
        self, parts: list[torch.Tensor], device_vals: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Any]:
        tensors = [p.reshape(-1).double() for p in parts]
        tensors += [v.reshape(1).double() for v in device_vals.values()]
        if not tensors:
            return torch.zeros(0, dtype=torch.float64), None
        device = tensors[0].device
        packed = torch.cat([t.to(device) for t in tensors])
        if packed.device.type != "cuda":
            return packed.cpu(), None
        host = packed.to("cpu", non_blocking=True)
        ready = torch.cuda.Event(blocking=True)
        ready.record()
        return host, ready

    def _ensure_layout(self) -> None:
        if self._layout_sent:
            return
        self._layout_sent = True
        for handle in self._order_handles:
            handle.remove()
        self._order_handles = []
        layers = order_by_first_call(self._layers, self._call_order)
        self._layers = layers
        reg_to_layer = np.empty(len(layers), dtype=np.int64)
        for index, lay in enumerate(layers):
            reg_to_layer[lay.reg_index] = index
        probe = ParamProbe(layers) if "param" in self.probes or self._epoch_stats else None
        self._param_probe = probe if "param" in self.probes else None
        if self._epoch_stats and probe is not None:
            self._epoch_probe = probe
            self._epoch_snapshot = Snapshot(probe.params, probe.device)
            self._epoch_w_sq = self._epoch_snapshot.take()
        device = str(probe.device) if probe is not None else "cpu"
        self._writer.put(
            Layout(
                path=self.path,
                layers=[lay.info(i) for i, lay in enumerate(layers)],
                probes=self.probes,
                layer_starts=probe.layer_starts if probe else np.zeros(0, np.int64),
                layer_numel=probe.layer_numel if probe else np.zeros(0),
                reg_to_layer=reg_to_layer,
                param_count=len(probe.params) if probe else 0,
                config=self._config,
                attrs={
                    "device": device,
                    "flush_every": self._flush[0],
                    "flush_seconds": self._flush[1],
                    "optimizer": type(self.optimizer).__name__ if self.optimizer else "",
                    "world_size": self.world_size,
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


def _split_scalars(values: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Device tensors stay tensors (no sync); CPU tensors and numbers become floats."""
    device: dict[str, torch.Tensor] = {}
    host: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            device[name] = value.detach()
        else:
            host[name] = float(value)
    return device, host


def _select(layers: list[LayerSpec], select: LayerSelect) -> list[LayerSpec]:
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
    if not chosen:
        raise GradflowError(
            "no layer to record: the model has no module owning trainable parameters"
            if select is None
            else f"layer selection {select!r} matches no layer"
        )
    for i, lay in enumerate(chosen):
        lay.reg_index = i
    return chosen
