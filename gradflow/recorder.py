"""The Recorder: hooks a model and its optimizer and streams per-layer statistics to a run file."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
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
from gradflow.kernels import kernel_backend
from gradflow.layers import (
    LayerSpec,
    discover_layers,
    eager_name,
    first_tensor,
    floating_tensors,
    order_by_first_call,
)
from gradflow.names import STEP_PROBES
from gradflow.probes import (
    PROBES,
    Attachment,
    Block,
    CallLog,
    LayerMap,
    ParamReductions,
    Probe,
    Snapshot,
)
from gradflow.probes.param import local
from gradflow.runfile import Event, WriteLock, check_writable
from gradflow.schedule import Schedule, as_schedule
from gradflow.writer import EpochItem, NullWriter, Relayout, RunLayout, StepItem, WriterThread

_OPEN: weakref.WeakKeyDictionary[nn.Module, Recorder] = weakref.WeakKeyDictionary()
LayerSelect = Sequence[str] | Callable[[str, nn.Module], bool] | None


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that hold it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), unwrapped repeatedly."""
    seen: set[int] = set()
    current = optimizer
    # A wrapper may subclass Optimizer without its step hooks (AcceleratedOptimizer does).
    while not (
        isinstance(current, torch.optim.Optimizer) and hasattr(current, "_optimizer_step_pre_hooks")
    ):
        inner = getattr(current, "optimizer", None)
        if inner is None or id(current) in seen:
            raise GradflowError(
                "optimizer must be a torch.optim.Optimizer or an object holding one as "
                f".optimizer, got {type(optimizer).__name__}"
            )
        seen.add(id(current))
        current = inner
    return current


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    items = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    found = [unwrap_optimizer(item) for item in items]
    if len({id(o) for o in found}) != len(found):
        raise GradflowError("the same optimizer is given twice")
    return found


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

    ``optimizer.step(closure)`` (LBFGS, Lightning's automatic optimization): the gradients
    and weights are read right after the closure's first call, so they are those at the
    weights before the step; the update is measured around the whole ``step()``. Only the
    first closure call's forward and backward count for the activation and output-gradient
    statistics (LBFGS evaluates the closure again at trial weights).

    Several optimizers (``[opt_a, opt_b]``): each parameter is measured around the step of
    the optimizer that holds it (parameters no optimizer holds go with the first). A row
    closes when every optimizer has stepped once since it opened, or, when one steps a
    second time before that, just before that second step (or before a step that finds
    the parameters changed since the row opened); parameters whose optimizer did not step
    within a row are NaN there.

    A layer none of whose parameters has a gradient at the step (``grad is None``: an
    unused branch, frozen after attaching) has NaN gradient statistics there (not
    measured); where only some have one, they are those of the parameters that have one.
    Its weight and update are measured as usual (a parameter the optimizer skipped: an
    update of 0). A layer not called within a row has NaN activation and output-gradient
    statistics there. With ``scaler``, output gradients are those of the unscaled loss
    (divided by the loss scale of their backward pass), like the parameter gradients.
    Layer outputs computed again during backward (activation checkpointing) are not
    counted again. A parameter whose size, dtype or
    device changed, a new parameter group, or a replaced submodule make the next recorded
    step measure the new parameters (the run file's layers keep the sizes they were
    written with); a change of the set of recorded layers raises :class:`GradflowError`.
    A model that ran compiled (``torch.compile``) before the Recorder attached does not
    call its hooks: the first recorded step raises :class:`GradflowError` (attach before
    the first compiled call, or call ``torch._dynamo.reset()``). The run file is created,
    with its layers, at the model's first training forward (or first step).

    Args:
        model: the module to watch (DDP and ``torch.compile`` wrappers are unwrapped;
            layers inside compiled submodules keep their eager names).
        optimizer: its optimizer, a list of optimizers, or None; wrappers holding the real
            optimizer as ``.optimizer`` (accelerate, Lightning) are unwrapped.
        path: the run file to write.
        every: which steps to record: an int ``n`` (every n-th step) or ``step -> bool``.
        probes: one or several of ``"param"``, ``"activation"``, ``"grad_output"`` (or
            probes registered in :data:`gradflow.probes.PROBES`).
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
        optimizer: Any = None,
        path: str | os.PathLike[str] = "run.h5",
        *,
        every: int | Schedule | None = None,
        probes: str | Iterable[str] = STEP_PROBES,
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
        model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
        if not isinstance(model, nn.Module):
            raise GradflowError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.probes = _check_probes(probes)
        _check_arguments(
            path=path,
            flush_every=flush_every,
            flush_seconds=flush_seconds,
            scaler=scaler,
            config=config,
            resume=resume,
            write_rank=write_rank,
            flags={
                "overwrite": overwrite,
                "epoch_stats": epoch_stats,
                "reduce_activations": reduce_activations,
            },
        )
        if layers is not None and not (callable(layers) or _is_names(layers)):
            raise GradflowError(
                "layers must be a name prefix, a list of them, or a (name, module) -> bool "
                f"predicate, got {type(layers).__name__}"
            )
        self._optimizers = _optimizers(optimizer)
        self.schedule = as_schedule(every)
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
        if write_rank >= self.world_size:
            raise GradflowError(f"write_rank {write_rank} is not a rank of {self.world_size}")
        self._writes = self.rank == write_rank
        self._reduce_activations = reduce_activations and self.world_size > 1
        # gradflow's own collectives run in a group of their own, apart from the model's.
        self._group = torch.distributed.new_group() if self._reduce_activations else None
        if self._writes and resume is None:
            check_writable(self.path, overwrite=overwrite)
        elif self._writes and not self.path.exists():
            raise GradflowError(f"{self.path}: cannot resume, no such run file")
        if self._writes:  # refused here, not at the first write, while another process writes it
            WriteLock.acquire(self.path).release()
        self.model = model
        self.optimizer = self._optimizers[0] if self._optimizers else None
        self.step, self.epoch = resume if resume is not None else (0, 0)
        self._resume = resume
        self._config = dict(config or {})
        self._overwrite = overwrite
        self._epoch_stats = epoch_stats
        self._flush = (flush_every, flush_seconds)

        self._select = layers
        self._layers = _select(discover_layers(model), layers)
        self._grads_at_attach = {
            id(p): (weakref.ref(p.grad), p.grad._version)
            for lay in self._layers
            for p in lay.params
            if p.grad is not None
        }
        self._layout_sent = False
        self._probes: list[Probe] = [PROBES.get(name)() for name in self.probes]
        self._step_probes = [p for p in self._probes if p.scope == "step"]
        self._call_probes = [p for p in self._probes if p.scope == "call"]
        self._signature: list[tuple[Any, ...]] = []
        self._reg_to_layer = np.zeros(0, np.int64)
        self._epoch_snapshot: Snapshot | None = None
        self._epoch_probe: ParamReductions | None = None
        self._epoch_w_sq: torch.Tensor | None = None
        self._epoch_stale = False
        self._call_order: dict[str, int] = {}
        self._active = self.schedule(self.step)
        self._log = CallLog()  # layer calls since the last optimizer step
        self._row_logs: list[CallLog] = []  # those of the row being measured, per step
        self._next_scalars: dict[str, Any] = {}
        self._open_row: dict[str, Any] | None = None
        self._row_steps: set[int] = set()  # optimizers that stepped in the row being measured
        self._split_steps = 0  # optimizers that stepped in the row split off this one
        self._row_skipped = False
        self._replaying = 0  # inside a second or later call of a step's closure
        self._backward_task = -1  # the backward pass whose end makes a row (no optimizer)
        self._forward_seen = False  # a forward of the model ran since the Recorder attached
        self._root_trained = False  # a training forward of the model ran in the recorded row
        self._layer_called = False  # a layer's forward hook ran on a recorded step
        self._stepped = False
        self._hook_s = 0.0
        self._stats_s = 0.0
        self._t0 = time.perf_counter()
        self._handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._order_handles: list[Any] = []
        self._module_ids: set[int] = set()
        self._dirty = False  # a submodule or parameter of the model was (re)registered
        self._n_groups: list[int] = []
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
        """Names of the recorded layers as in the run file (``(root)`` for the model
        itself), in forward order once the first forward ran."""
        return [lay.name or "(root)" for lay in self._layers]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The (unwrapped) optimizers whose steps are measured."""
        return list(self._optimizers)

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
        if self._open_row is not None and not self._row_steps:
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
        self._end_row()
        self._check_layout(always=True)  # the epoch's snapshot is read on any step
        device_vals, host_vals = _split_scalars(metrics)
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
                probe="param",
                block=block,
            )
        )
        self.epoch += 1

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything recorded so far is committed to the run file
        (e.g. before saving a checkpoint that a resumed run will continue from)."""
        if self._closed or self._inert:
            return
        self._ensure_layout()
        self._wait_for_writer("flushing", timeout)

    def _wait_for_writer(self, doing: str, timeout: float = 60.0) -> None:
        """Block until the writer has committed everything queued so far."""
        done = threading.Event()
        self._writer.put(done)
        deadline = time.monotonic() + timeout
        # A writer that failed may be busy closing its file: its error ends the wait.
        while not done.wait(0.05) and self._writer.error is None:
            if time.monotonic() > deadline:
                break
        if not done.is_set() or self._writer.error is not None:
            why = reason(self._writer.error) if self._writer.error else "timed out"
            raise GradflowError(f"{self.path}: {doing} the run file failed: {why}")

    def close(self) -> None:
        """Write what is pending, remove every hook, close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._inert:
                self._ensure_layout()
                self._end_row()
        finally:
            # Compiled code may keep calling hooks it was traced with: they check this.
            self._active = False
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
    # Hooks that Dynamo may trace (torch.compile) do only attribute checks and dict updates;
    # their work runs in torch.compiler.disable'd methods, eagerly, on real tensors (a graph
    # break on recorded steps, none on unrecorded ones: Dynamo guards on the checks).
    def _attach(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_root_pre))
        self._handles.append(model.register_forward_hook(self._on_root_post))
        self._hook_layers()
        for name, module in model.named_modules():
            self._order_handles.append(
                module.register_forward_pre_hook(partial(self._note_call, eager_name(name)))
            )
        for index, opt in enumerate(self._optimizers):
            self._handles.append(opt.register_step_pre_hook(partial(self._on_step_pre, index)))
            self._handles.append(opt.register_step_post_hook(partial(self._on_step_post, index)))
        self._module_ids = {id(m) for m in model.modules()}
        registration = torch.nn.modules.module
        self._handles.append(
            registration.register_module_module_registration_hook(self._on_registration)
        )
        self._handles.append(
            registration.register_module_parameter_registration_hook(self._on_registration)
        )
        if self._scaler is not None:
            self._wrap_scaler()

    def _hook_layers(self) -> None:
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles = []
        if self._call_probes:
            attachment = self._attachment()
            for probe in self._call_probes:
                probe.attach(attachment)
            for lay in self._layers:
                self._layer_handles.append(
                    lay.module.register_forward_hook(partial(self._on_layer_output, lay.reg_index))
                )

    def _detach(self) -> None:
        for probe in self._probes:
            probe.detach()
        for handle in self._handles + self._layer_handles + self._order_handles:
            handle.remove()
        self._handles, self._layer_handles, self._order_handles = [], [], []
        if self._scaler_step is not None:
            del self._scaler.step
            self._scaler_step = None

    def _on_registration(self, module: nn.Module, name: str, value: Any) -> None:
        if id(module) in self._module_ids:
            self._dirty = True

    def _note_call(self, name: str, module: nn.Module, args: Any) -> None:
        if module.training and not self._layout_sent:
            self._call_order.setdefault(name, len(self._call_order))

    @torch.compiler.disable
    def _on_root_pre(self, module: nn.Module, args: Any) -> None:
        self._forward_seen = True
        self._root_trained |= module.training and self._active
        if self._dirty and self._active and self._layout_sent and not self._row_steps:
            self._rederive()
        if self._open_row is not None and not self._row_steps:
            self._finalize_row()

    @torch.compiler.disable
    def _on_root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        if not self._layout_sent:
            self._ensure_layout()
        if not self._optimizers and self._active:
            # Every output: a loss may use any of them (one row per backward, see below).
            for out in floating_tensors(output):
                if out.requires_grad:
                    out.register_hook(self._queue_backward_end)

    def _on_layer_output(self, layer_id: int, module: nn.Module, args: Any, output: Any) -> None:
        if self._active and module.training:
            self._layer_output(layer_id, output)

    @torch.compiler.disable
    def _layer_output(self, layer_id: int, output: Any) -> None:
        self._layer_called = True
        out = first_tensor(output)
        if out is None or self._replaying:
            return
        t0 = time.perf_counter()
        # A forward, not a recomputation in backward (activation checkpointing)
        forward = torch._C._current_graph_task_id() == -1
        for probe in self._call_probes:
            probe.on_output(out, self._log, layer_id, forward)
        self._hook_s += time.perf_counter() - t0

    def _current_log(self) -> CallLog:
        return self._log

    def _queue_backward_end(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._backward_task:  # once per backward, however many outputs it reaches
            self._backward_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._ensure_layout()
        self._check_layout()
        self._begin(0, measure=True)
        self._end(0, stepped=False, has_update=False)

    @torch.compiler.disable
    def _on_step_pre(self, index: int, optimizer: Any, args: Any, kwargs: Any) -> Any:
        # args[0] is the optimizer itself (step hooks see the bound call's arguments).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:  # else the layout waits for the closure's forward (its order)
            self._ensure_layout()
        if index in self._row_steps:  # stepped again before every optimizer stepped once
            # Layer calls since this optimizer's last step belong to the row it opens now.
            self._close_step(carry=True)
        elif self._row_steps and self._active and self._layout_changed():
            # Parameters changed between two optimizers' steps: the row measured so far
            # closes with the old layout, this step opens one with the new, which closes
            # once the optimizers that had not stepped have.
            stepped = len(self._row_steps)
            self._close_step(carry=True)
            self._split_steps = stepped
        if not self._row_steps:
            self._check_layout()
        self._stepped = True
        self._begin(index, measure=closure is None)
        if closure is None or not self._active:
            return None
        wrapped = self._wrap_closure(closure, index)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    @torch.compiler.disable
    def _on_step_post(self, index: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._end(index, stepped=True, has_update=True)

    def _wrap_closure(self, closure: Callable[..., Any], index: int) -> Callable[..., Any]:
        calls = 0

        def first_call_measured(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                self._replaying += 1
                try:
                    return closure(*args, **kwargs)
                finally:
                    self._replaying -= 1
            result = closure(*args, **kwargs)
            # Optimizers call the closure before they change the weights: these are the
            # weights and gradients of the step.
            self._measure_before(index)
            return result

        return first_call_measured

    def _begin(self, index: int, *, measure: bool) -> None:
        """An optimizer's step starts (``measure``: read gradients and weights now)."""
        if not self._row_steps and self._open_row is not None:
            self._finalize_row()
        self._row_steps.add(index)
        if measure:
            self._measure_before(index)

    def _measure_before(self, index: int) -> None:
        if self._active:
            self._ensure_layout()
        if self._active and self._step_probes:
            t0 = time.perf_counter()
            for probe in self._step_probes:
                probe.before_step(index)
            self._stats_s += time.perf_counter() - t0

    def _end(self, index: int, *, stepped: bool, has_update: bool, skipped: bool = False) -> None:
        """An optimizer's step ended; the row closes once every optimizer stepped."""
        self._ensure_layout()
        if self._active and self._step_probes:
            t0 = time.perf_counter()
            for probe in self._step_probes:
                probe.after_step(index, stepped, has_update)
            self._stats_s += time.perf_counter() - t0
        self._row_skipped |= skipped
        if self._active:
            self._row_logs.append(self._log)
            self._log = CallLog()
        if len(self._row_steps) + self._split_steps >= max(1, len(self._optimizers)):
            self._close_step()

    def _end_row(self) -> None:
        """Close a row some optimizers have not stepped in, then hand over any closed row."""
        if self._row_steps:
            self._close_step()
        self._finalize_row()

    def _wrap_scaler(self) -> None:
        scaler = self._scaler
        original = scaler.step
        index_of = {id(opt): i for i, opt in enumerate(self._optimizers)}

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            self._stepped = False
            scale = getattr(scaler, "_scale", None)
            scale = scale.detach().clone().reshape(()) if isinstance(scale, torch.Tensor) else None
            out = original(optimizer, *args, **kwargs)
            index = index_of.get(id(unwrap_optimizer(optimizer)))
            if not self._stepped and index is not None:
                # The scaler found inf/NaN and skipped optimizer.step().
                self._ensure_layout()
                if index in self._row_steps:
                    self._close_step(carry=True)
                self._begin(index, measure=True)
                self._end(index, stepped=False, has_update=True, skipped=True)
            if scale is not None and self._open_row is not None and not self._row_steps:
                self._open_row["scalars"]["scale"] = scale
            elif scale is not None and self._active:
                self._next_scalars["scale"] = scale
            return out

        scaler.step = step
        self._scaler_step = step

    # -- rows ---------------------------------------------------------------------------
    def _close_step(self, *, carry: bool = False) -> None:
        """Close the row being measured (``carry``: the layer calls since the last
        optimizer step stay for the next row)."""
        if self._active:
            logs = self._row_logs if carry else [*self._row_logs, self._log]
            log = CallLog.merged(logs, self.probes)
            if (
                self._layer_handles
                and not self._layer_called
                and (self._root_trained or not self._forward_seen)
            ):
                self._refuse_if_compiled_before()
            t0 = time.perf_counter()
            packed = {p.name: out for p in self._step_probes if (out := p.pack()) is not None}
            self._stats_s += time.perf_counter() - t0
            self._open_row = {
                "step": self.step,
                "epoch": self.epoch,
                "time": time.perf_counter() - self._t0,
                "packed": packed,
                "log": log.all_reduce(self.world_size, self.probes, self._group)
                if self._reduce_activations
                else log,
                "scalars": self._next_scalars,
                "skipped": self._row_skipped,
            }
        self._row_logs = []
        if not carry:
            self._log = CallLog()
            for probe in self._call_probes:
                probe.new_row()
        self._next_scalars = {}
        self._row_steps = set()
        self._split_steps = 0
        self._row_skipped = False
        self._root_trained = False
        self.step += 1
        self._active = self.schedule(self.step)

    def _refuse_if_compiled_before(self) -> None:
        """A recorded row whose layers got gradients from a backward pass after the Recorder
        attached while none of their forward hooks ran: if torch.compile compiled code
        before the hooks existed, that code does not call them (raised before the row,
        whose activation and output-gradient statistics would all be NaN, is written)."""
        dynamo_utils = sys.modules.get("torch._dynamo.utils")
        if dynamo_utils is None or not dynamo_utils.counters["stats"]["unique_graphs"]:
            return
        if self._backward_since_attach():
            raise GradflowError(
                "the model ran compiled (torch.compile) before the Recorder attached, so its "
                "compiled code does not call the Recorder's hooks: create the Recorder before "
                "the first call of the compiled model, or call torch._dynamo.reset() after "
                "creating it"
            )

    def _backward_since_attach(self) -> bool:
        """Whether a recorded parameter's gradient was made or changed since attaching
        (else the Recorder attached between a backward pass and its step)."""
        for lay in self._layers:
            for p in lay.params:
                grad = p.grad
                if grad is None:
                    continue
                then = self._grads_at_attach.get(id(p))
                if then is None or then[0]() is not grad or then[1] != grad._version:
                    return True
        return False

    def _finalize_row(self) -> None:
        row, self._open_row = self._open_row, None
        if row is None:
            return
        t0 = time.perf_counter()
        log: CallLog = row["log"]
        device_vals, host_vals = _split_scalars(row["scalars"])
        # Step probes' blocks first, then the call probes' (one tensor for all where the
        # log was merged or reduced across ranks): the writer unpacks them in this order.
        stepped: dict[str, tuple[torch.Tensor, Block]] = row["packed"]
        blocks = {name: block for name, (_, block) in stepped.items()}
        blocks.update(log.blocks(self.probes))
        parts = [t for t, _ in stepped.values()] + log.tensors(self.probes)
        packed, ready = self._to_host(parts, device_vals)
        copy_s = time.perf_counter() - t0
        self._writer.put(
            StepItem(
                step=row["step"],
                epoch=row["epoch"],
                time=row["time"],
                packed=packed,
                ready=ready,
                blocks=blocks,
                scalar_names=list(device_vals),
                host_scalars=host_vals,
                skipped=row["skipped"],
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

    # -- layout ---------------------------------------------------------------------------
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
        return Attachment(self._layers, owners, self._current_log)

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
            self._dirty
            or [len(opt.param_groups) for opt in self._optimizers] != self._n_groups
            or _signature(self._layers) != self._signature
        )

    def _rederive(self) -> None:
        self._finalize_row()  # written with the layout it was measured with
        self._dirty = False
        known, self._module_ids = self._module_ids, {id(m) for m in self.model.modules()}
        old = {lay.name: lay for lay in self._layers}
        # Parameters frozen since they were recorded stay recorded (no gradient: NaN); layers
        # frozen when the layout was taken stay unrecorded once unfrozen, as they are
        # between re-derivations.
        recorded = frozenset(id(p) for lay in self._layers for p in lay.params)
        try:
            found = _select(discover_layers(self.model, keep=recorded), self._select)
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


def _signature(layers: Sequence[LayerSpec]) -> list[tuple[Any, ...]]:
    """Shape, dtype and device of every recorded parameter: a change means new probes."""
    return [(p.shape, p.dtype, p.device) for lay in layers for p in lay.params]


def _is_names(value: Any) -> bool:
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    )


def _check_probes(probes: Any) -> tuple[str, ...]:
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


def _check_arguments(
    *,
    path: Any,
    flush_every: Any,
    flush_seconds: Any,
    scaler: Any,
    config: Any,
    resume: Any,
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
    if resume is not None and not (
        isinstance(resume, (tuple, list))
        and len(resume) == 2
        and all(is_int(v) and v >= 0 for v in resume)
    ):
        raise GradflowError(f"resume must be (step, epoch), two integers >= 0, got {resume!r}")
    if not is_int(write_rank) or write_rank < 0:
        raise GradflowError(f"write_rank must be an integer >= 0, got {write_rank!r}")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise GradflowError(f"{name} must be True or False, got {value!r}")


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
