"""The Recorder's rows: measuring around optimizer steps, closing a row, handing it to the
writer thread (see :mod:`gradflow.recorder.rows` for the states)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import torch

from gradflow.errors import GradflowError, reason
from gradflow.probes import CallLog
from gradflow.recorder.base import RecorderBase
from gradflow.recorder.options import split_scalars
from gradflow.recorder.rows import MeasuredRow, RowPhase
from gradflow.writer import StepItem


class MeasureMixin(RecorderBase):
    """Optimizer steps begin and end; rows close and go to the writer."""

    def _begin(self, index: int, *, measure: bool) -> None:
        """An optimizer's step starts (``measure``: read gradients and weights now)."""
        if self._rows.phase is RowPhase.CLOSED:
            self._finalize_row()
        self._rows.step(index)
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
        self._rows.skipped |= skipped
        if self._active:
            self._row_logs.append(self._retire_log())
        if self._rows.complete(len(self._optimizers)):
            self._close_step()

    def _retire_log(self) -> CallLog:
        """The call log being written, with the calls native hooks measured since the last
        retired one (:meth:`Probe.collect`); a new log takes its place."""
        log = self._log
        for probe in self._call_probes:
            probe.collect(log)
        self._log = CallLog()
        return log

    def _end_row(self) -> None:
        """Close a row some optimizers have not stepped in, then hand over any closed row."""
        if self._rows.phase is RowPhase.STEPPING:
            self._close_step()
        self._finalize_row()

    def _close_step(self, *, carry: bool = False, split: int = 0) -> None:
        """Close the row being measured (``carry``: the layer calls since the last
        optimizer step stay for the next row; ``split``: see :meth:`RowState.close`)."""
        row = None
        if self._active:
            logs = self._row_logs if carry else [*self._row_logs, self._retire_log()]
            log = CallLog.merged(logs, self.probes)
            if (
                self._layer_handles
                and not self._rows.layer_called
                and (self._rows.root_trained or not self._forward_seen)
            ):
                self._refuse_if_compiled_before()
            t0 = time.perf_counter()
            packed = {p.name: out for p in self._step_probes if (out := p.pack()) is not None}
            self._stats_s += time.perf_counter() - t0
            row = MeasuredRow(
                step=self.step,
                epoch=self.epoch,
                time=time.perf_counter() - self._t0,
                packed=packed,
                log=log.all_reduce(self.world_size, self.probes, self._group)
                if self._reduce_activations
                else log,
                scalars=self._rows.scalars,
                skipped=self._rows.skipped,
            )
        self._row_logs = []
        if not carry:
            self._log = CallLog()
            for probe in self._call_probes:
                probe.new_row()
        self._rows.close(row, split=split)
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
        row = self._rows.take()
        if row is None:
            return
        t0 = time.perf_counter()
        log = row.log
        device_vals, host_vals = split_scalars(row.scalar_means())
        # Step probes' blocks first, then the call probes' (one tensor for all where the
        # log was merged or reduced across ranks): the writer unpacks them in this order.
        stepped = row.packed
        blocks = {name: block for name, (_, block) in stepped.items()}
        blocks.update(log.blocks(self.probes))
        parts = [t for t, _ in stepped.values()] + log.tensors(self.probes)
        packed, ready = self._to_host(parts, device_vals)
        copy_s = time.perf_counter() - t0
        if self._budget is not None:
            self._budget.charge(self._hook_s + log.hook_s + self._stats_s + copy_s)
        self._writer.put(
            StepItem(
                step=row.step,
                epoch=row.epoch,
                time=row.time,
                packed=packed,
                ready=ready,
                blocks=blocks,
                scalar_names=list(device_vals),
                host_scalars=host_vals,
                skipped=row.skipped,
                overhead=[self._hook_s + log.hook_s, self._stats_s, copy_s],
            )
        )
        self._hook_s = self._stats_s = 0.0

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
