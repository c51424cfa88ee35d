"""Reductions on accelerators by torch operations: per layer call without a host sync
(rows written in place on the device), and :class:`Replayed`, which replays a fixed
sequence of device work as one CUDA graph (the parameter reductions, see
:class:`gradflow.probes.snapshot.Snapshot`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradflow.kernels import CALL_COLUMNS
from gradflow.kernels.triton import Launch, reducer


class DeviceRows:
    """Per-call float64 reductions on an accelerator, written in place (one stack of
    hundreds of 0-d tensors would cost a copy call each): by the reductions' ``out=``, or
    by ``fused`` (:func:`gradflow.kernels.triton.reducer`), which adds into zeroed rows."""

    CHUNK = 256

    def __init__(self, device: torch.device, width: int, fused: Launch | None = None) -> None:
        self.device, self.width, self.fused = device, width, fused
        self.chunks: list[torch.Tensor] = []
        self.n = 0

    def next_row(self) -> tuple[torch.Tensor, int]:
        """The chunk and index of a new row."""
        i = self.n % self.CHUNK
        if i == 0:
            new = torch.zeros if self.fused is not None else torch.empty
            self.chunks.append(new(self.CHUNK, self.width, dtype=torch.float64, device=self.device))
        self.n += 1
        return self.chunks[-1], i

    def claim(self) -> tuple[torch.Tensor, ...]:
        """The ``width`` 0-d views of a new row."""
        chunk, i = self.next_row()
        return chunk[i].unbind()

    @property
    def rows(self) -> torch.Tensor:
        whole = self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks)
        return whole[: self.n]

    def tensor(self) -> torch.Tensor:
        """The rows as one float64 vector (on the device)."""
        return self.rows.reshape(-1)


def call_rows(device: torch.device, columns: Sequence[str]) -> DeviceRows:
    """Rows for per-call ``columns`` (all of :data:`CALL_COLUMNS`, or ``sum_sq`` alone) on
    ``device``, filled by the Triton kernel where it is on (:func:`reduce_into`)."""
    fused = reducer(device) if tuple(columns) == CALL_COLUMNS else None
    return DeviceRows(device, len(columns), fused)


def reduce_into(x: torch.Tensor, rows: DeviceRows) -> None:
    """The columns of ``rows`` of ``x`` into a new row, no host sync: on CUDA with Triton one
    fused kernel (:mod:`gradflow.kernels.triton`); elsewhere torch kernels accumulating in
    float64, the sums those of x less its first entry, rebuilt (else ``sum_sq / n - mean^2``
    would cancel the rounding of the sums into the variance, far from zero), counts as
    0-norms (``x * 0`` is NaN exactly where ``x`` is NaN or Inf; ``count_nonzero`` would
    copy its count to the host)."""
    f64 = torch.float64
    if rows.width == 1:  # sum_sq alone
        (sum_sq,) = rows.claim()
        norm = torch.linalg.vector_norm(x.detach(), dtype=f64)
        torch.mul(norm, norm, out=sum_sq)
        return
    if rows.fused is not None:
        chunk, i = rows.next_row()
        rows.fused(x, chunk, i)
        return
    total, sum_sq, nonzero, nonfinite = rows.claim()
    flat = x.detach().reshape(-1)
    # One entry, not the mean, as the shift: a pass less over x.
    work = flat if flat.dtype in (torch.float32, f64) else flat.float()
    x0 = torch.nan_to_num(work[:1].sum(), nan=0.0, posinf=0.0, neginf=0.0)
    y = work - x0
    s_y, q_y = torch.sum(y, 0, dtype=f64), torch.linalg.vector_norm(y, dtype=f64).square()
    shift, n = x0.to(f64), flat.numel()
    torch.add(s_y, n * shift, out=total)
    # y has x's NaN and Inf entries: then its sums are x's
    rebuilt = q_y + 2.0 * shift * s_y + n * shift * shift
    torch.where(s_y.isfinite() & q_y.isfinite(), rebuilt, q_y, out=sum_sq)
    torch.linalg.vector_norm(flat, 0, dtype=f64, out=nonzero)
    torch.linalg.vector_norm(flat * 0, 0, dtype=f64, out=nonfinite)


class Replayed:
    """A fixed sequence of device work (``fn``, on tensors whose addresses never change)
    run eagerly once, then captured as a CUDA graph and replayed: one launch instead of
    dozens, each of which costs the host ~10-30 us in a host-bound training step.

    Outputs of a replay are the graph's static tensors: read them before the next call.
    Where capture fails (an older driver, another capture in progress), it stays eager.
    ``parameters``: tensors whose storage must not move; a move means a new capture.
    """

    def __init__(
        self, fn: Callable[[], Any], device: torch.device, parameters: Sequence[torch.Tensor]
    ) -> None:
        self.fn, self.device, self.parameters = fn, device, list(parameters)
        self.graph: Any = None
        self.out: Any = None
        self.failed = False
        self._addresses: list[int] = []

    def __call__(self) -> Any:
        addresses = [p.data_ptr() for p in self.parameters]
        if self.graph is not None and addresses == self._addresses:
            self.graph.replay()
            return self.out
        out = self.fn()
        if not self.failed and not torch.cuda.is_current_stream_capturing():
            self._capture(addresses)
        return out

    def _capture(self, addresses: list[int]) -> None:
        self.graph = self.out = None
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                # thread_local: the writer thread may wait on an event meanwhile.
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = self.fn()
                finally:
                    graph.capture_end()
        except Exception:  # capture is an optimisation: stay eager
            self.failed = True
            return
        finally:
            current.wait_stream(stream)
        self.graph, self.out, self._addresses = graph, out, addresses
