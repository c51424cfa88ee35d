"""The Recorder: hooks a model and its optimizer and streams per-layer statistics to a run file.

Its parts: :mod:`~gradflow.recorder.hooks`, :mod:`~gradflow.recorder.measure` (rows),
:mod:`~gradflow.recorder.layout`; the row states in :mod:`~gradflow.recorder.rows`."""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradflow.budget import BudgetSchedule
from gradflow.errors import GradflowError, reason
from gradflow.names import DEFAULT_PROBES
from gradflow.probes import PROBES, CallLog, Probe
from gradflow.recorder.hooks import HooksMixin
from gradflow.recorder.layout import LayoutMixin
from gradflow.recorder.measure import MeasureMixin
from gradflow.recorder.options import (
    LayerSelect,
    check_arguments,
    check_probes,
    choose_schedule,
    logged_values,
    optimizers_of,
    split_scalars,
    writing_role,
)
from gradflow.recorder.rows import RowPhase, RowState
from gradflow.recorder.state import StateMixin
from gradflow.runfile import Event, WriteLock, check_writable
from gradflow.schedule import Schedule
from gradflow.writer import EpochItem, FileAttrs, NullWriter, WriterThread

_OPEN: weakref.WeakKeyDictionary[nn.Module, Recorder] = weakref.WeakKeyDictionary()


class Recorder(HooksMixin, MeasureMixin, LayoutMixin, StateMixin):
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

    A frozen layer (every parameter ``requires_grad=False``) is not measured while frozen:
    its statistics are NaN and it costs nothing; it is measured from the step it is
    unfrozen on. A layer none of whose parameters has a gradient at the step (``grad is
    None``: an unused branch) has NaN gradient statistics there (not
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
            optimizer as ``.optimizer`` (accelerate, Lightning) are unwrapped; a wrapper
            holding it as ``.base`` (``schedulefree.ScheduleFreeWrapper``), or any object
            with ``step()`` and ``param_groups``, is measured around its own ``step()``: the
            update is the real change of the parameters across it.
        path: the run file to write.
        every: which steps to record: an int ``n`` (every n-th step) or ``step -> bool``.
        budget: instead of ``every``, the largest share of the wall time the recorder may
            spend (e.g. ``0.02``), or a :class:`~gradflow.budget.BudgetSchedule` (to give
            ``steps_per_epoch``): it then picks the recorded steps itself (see
            :mod:`gradflow.budget`); the run file's ``budget`` and ``budget_reached``
            attributes hold the budget and the share reached.
        probes: one or several of ``"param"``, ``"activation"``, ``"grad_output"`` (or
            probes registered in :data:`gradflow.probes.PROBES`).
        layers: name prefixes or a ``(name, module) -> bool`` predicate selecting layers.
        scaler: a ``torch.amp.GradScaler`` in use (records scale and skipped steps).
        flush_every: rows between flushes to disk (the first flushes hold 1, 2, 4, ...
            rows up to it); ``flush_seconds``: seconds between them.
        config: JSON-able description of the run, stored in the file.
        overwrite: replace an existing file (default: refuse).
        epoch_stats: record the per-epoch update ``|W_end - W_start|`` at :meth:`epoch_end`
            (keeps one more float32 copy of the parameters).
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
        budget: float | BudgetSchedule | None = None,
        probes: str | Iterable[str] = DEFAULT_PROBES,
        layers: LayerSelect = None,
        scaler: Any = None,
        flush_every: int = 100,
        flush_seconds: float = 5.0,
        config: dict[str, Any] | None = None,
        overwrite: bool = False,
        epoch_stats: bool = True,
        write_rank: int = 0,
        reduce_activations: bool = False,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
        if not isinstance(model, nn.Module):
            raise GradflowError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.probes = check_probes(probes)
        check_arguments(
            path=path,
            layers=layers,
            flush_every=flush_every,
            flush_seconds=flush_seconds,
            scaler=scaler,
            config=config,
            write_rank=write_rank,
            flags={
                "overwrite": overwrite,
                "epoch_stats": epoch_stats,
                "reduce_activations": reduce_activations,
            },
        )
        self._optimizers = optimizers_of(optimizer)
        self.schedule, self._budget, self._schedule_desc = choose_schedule(every, budget)
        self.path = Path(path)
        if model in _OPEN:
            other: Recorder = _OPEN[model]
            raise GradflowError(
                f"this model already has an open Recorder writing {other.path}; "
                "close it first (rec.close() or leave its with-block)"
            )
        self.rank, self.world_size, self._writes, self._reduce_activations = writing_role(
            write_rank, reduce_activations
        )
        # gradflow's own collectives run in a group of their own, apart from the model's.
        self._group = torch.distributed.new_group() if self._reduce_activations else None
        if self._writes:  # an existing file is refused at its creation: load_state_dict may come
            check_writable(self.path, overwrite=True)
            WriteLock.acquire(self.path).release()  # refused here while another process writes
        self.model = model
        self.optimizer = self._optimizers[0] if self._optimizers else None
        self._config = dict(config or {})
        self._overwrite = overwrite
        self._epoch_stats = epoch_stats
        self._flush = (flush_every, flush_seconds)

        self._init_layout(model, layers)
        self._probes: list[Probe] = [PROBES.get(name)() for name in self.probes]
        self._step_probes = [p for p in self._probes if p.scope == "step"]
        self._call_probes = [p for p in self._probes if p.scope == "call"]
        self._resume = None  # until load_state_dict() continues an existing file
        self.step = self.epoch = 0
        self._active = self.schedule(0)
        self._log = CallLog()  # layer calls since the last optimizer step
        self._row_logs: list[CallLog] = []  # those of the row being measured, per step
        self._rows = RowState()
        self._hook_s = 0.0
        self._stats_s = 0.0
        self._t0 = time.perf_counter()
        self._init_hooks(scaler)
        self._closed = False

        sharded = any(hasattr(p, "device_mesh") for lay in self._layers for p in lay.params)
        # A rank that neither writes nor joins collectives has nothing to do: no hooks at all.
        self._inert = not self._writes and not (sharded or self._reduce_activations)
        self._writer: WriterThread | NullWriter = (
            WriterThread(flush_every, flush_seconds) if self._writes else NullWriter()
        )
        self._writer.start()
        if self._budget is not None:
            writer = self._writer
            self._budget.bind(lambda: (writer.busy_s, writer.rows_written, writer.last_commit))
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
    def optimizers(self) -> list[Any]:
        """What each optimizer's ``step()`` is measured around: the unwrapped torch
        optimizer, or an optimizer-like wrapper measured around its own ``step()``."""
        return list(self._optimizers)

    @property
    def first_nonfinite(self) -> Event | None:
        """The first non-finite event seen so far (set by the writer thread, may lag a step)."""
        return self._writer.first_nonfinite

    def log(self, **scalars: float | torch.Tensor) -> None:
        """Attach scalars (e.g. ``loss=loss``) to the current step; tensors are not synced.

        A name logged several times within one optimizer step (a loss per micro-batch
        under gradient accumulation) is stored as the mean of its values, as the Lightning
        and transformers integrations do. Values logged right after ``step()``, before the
        next forward or step, belong to that step.

        Args:
            **scalars: name -> a number or a one-element tensor.
        """
        if self._closed:
            raise GradflowError("log() on a closed Recorder")
        if self._inert:
            return
        values = logged_values(scalars)
        self._rows.log(values, recorded=self._active)
        if self._budget is not None and "loss" in values:
            after = self.step + (self._rows.phase is RowPhase.STEPPING)
            self._active |= self._budget.loss(values["loss"], after)

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
        device_vals, host_vals = split_scalars(metrics)
        parts, block = self._epoch_update()
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
        if self._budget is not None:
            self._active |= self._budget.epoch_end(self.step)

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything recorded so far is committed to the run file
        (e.g. before saving a checkpoint that a resumed run will continue from)."""
        if self._closed or self._inert:
            return
        self._ensure_layout()
        self._wait_for_writer("flushing", timeout)

    def close(self) -> None:
        """Write what is pending, remove every hook, close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._inert:
                self._ensure_layout()
                self._end_row()
                if self._budget is not None:
                    self._writer.put(FileAttrs({"budget_reached": self._budget.reached()}))
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
