"""A flat float32 copy of parameters (the weights before an optimizer step) and the
per-tensor reductions read against it: of the gradients, the weights and the update."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gradflow.kernels import DELTA_COLUMNS
from gradflow.kernels.cpu import ParamKernels, param_kernels
from gradflow.kernels.device import Replayed


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def storage_order(t: torch.Tensor) -> list[int] | None:
    """The order of ``t``'s dimensions in memory where ``t`` is dense but not contiguous
    (channels-last convolution weights): ``t.permute(order)`` is then contiguous. None for a
    contiguous tensor or one with gaps.

    Args:
        t: a tensor.

    Returns:
        The dimensions by decreasing stride, or None.
    """
    if t.is_contiguous():
        return None
    strides = t.stride()
    order = sorted(range(t.dim()), key=lambda d: -strides[d])
    return order if t.permute(order).is_contiguous() else None


class Snapshot:
    """A float32 copy (float64 if any is float64) of (the local shards of) tensors in one
    flat buffer.

    Each tensor starts on a row of ``BLOCK`` elements (the gaps stay zero), so every
    per-tensor reduction is one vectorised reduction over the rows (float32 within a
    row) and one float64 ``index_add_`` of the rows into their tensors: a handful of
    kernels whatever the number of tensors, and accurate to ~1e-7 for tensors of any size.
    """

    BLOCK = 256

    def __init__(
        self, params: Sequence[torch.Tensor], device: torch.device, graphs: bool = False
    ) -> None:
        self.params = list(params)
        self.device = device
        sharded = any(hasattr(p, "device_mesh") for p in self.params)
        # Plain parameters are read as they are (under no_grad): no per-step wrappers.
        self._sources: list[torch.Tensor] | None = None if sharded else list(self.params)
        # On the CPU a dense parameter in another layout (channels-last) is read in its
        # memory order, as are its gradient and its copy: every reduction is over entries
        # paired position by position, so any one order of the dimensions gives the same
        # results, and the C kernels (and plain copies) then read it in place.
        orders = [storage_order(local(p)) if device.type == "cpu" else None for p in params]
        self._orders = orders if any(orders) else None
        self._shapes = [local(p).shape for p in self._in_order(self.params)]
        # float64 parameters keep a float64 copy: a float32 one would round W_before by
        # ~6e-8 of W, a large error in updates of 1e-5 of W and below.
        wide = any(local(p).dtype == torch.float64 for p in self.params)
        self.dtype = torch.float64 if wide else torch.float32
        sizes = np.array([local(p).numel() for p in self.params], dtype=np.int64)
        n_rows = -(-sizes // self.BLOCK)
        self._starts = np.concatenate([[0], np.cumsum(n_rows)[:-1]]).astype(np.int64)
        self._sizes = sizes
        self._n_rows = int(n_rows.sum())
        self._lengths = torch.tensor(n_rows, device=device)
        self._owner = torch.tensor(np.repeat(np.arange(len(sizes)), n_rows), device=device)
        self._rows = torch.empty(0)
        self._views: list[torch.Tensor] = []
        # On the CPU, one-pass C kernels do the same without the buffer's row layout (the
        # tensors are CPU tensors then: parameters and their gradients share a device).
        self._kernels = param_kernels(sizes.tolist()) if device.type == "cpu" else None
        # On CUDA each phase's reductions (and the copy and update of the parameters, whose
        # storage stays put) replay as one graph; gradients move: they are copied eagerly.
        self._phases: dict[str, Callable[[], Any]] = {
            "grads": self._grad_stats,
            "take": self._take_stats,
            "delta": self._delta_stats,
        }
        if graphs and device.type == "cuda" and self._sources is not None:
            # The gradient phase reads only the buffer, whose storage never moves.
            reads = {"grads": [], "take": self._sources, "delta": self._sources}
            self._phases = {
                name: Replayed(fn, device, reads[name]) for name, fn in self._phases.items()
            }

    def _native(self, tensors: Sequence[torch.Tensor | None]) -> ParamKernels | None:
        if self._kernels is None:
            return None
        present = [t for t in tensors if t is not None]
        return self._kernels if ParamKernels.usable(present) else None

    def _current(self) -> list[torch.Tensor]:
        current = self._sources if self._sources is not None else [local(p) for p in self.params]
        return self._in_order(current)

    def _in_order(self, tensors: list[Any]) -> list[Any]:
        """``tensors`` (one per parameter, or None) viewed in their parameters' memory order."""
        if self._orders is None:
            return tensors
        return [
            t if t is None or order is None else t.permute(order)
            for t, order in zip(tensors, self._orders, strict=True)
        ]

    def _buffer(self) -> list[torch.Tensor]:
        if not self._views:  # allocated at first use: unrecorded runs cost no memory
            flat = torch.zeros(self._n_rows * self.BLOCK, dtype=self.dtype, device=self.device)
            self._rows = flat.view(self._n_rows, self.BLOCK)
            self._views = [
                flat[start * self.BLOCK : start * self.BLOCK + size].view(shape)
                for start, size, shape in zip(self._starts, self._sizes, self._shapes, strict=True)
            ]
        return self._views

    def _per_tensor(self, *per_row: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor sums (float64 [P] each) of per-row values ([R] each), in one kernel."""
        rows = torch.stack(per_row).double()
        sums = torch.zeros(len(per_row), len(self._sizes), dtype=torch.float64, device=self.device)
        return list(sums.index_add_(1, self._owner, rows))

    def _row_squares(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self._rows, dim=1).square_()

    @torch.no_grad()
    def load(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """Copy ``tensors`` in (``None`` as zeros)."""
        views = self._buffer()
        pairs = [(v, t) for v, t in zip(views, tensors, strict=True) if t is not None]
        missing = [v for v, t in zip(views, tensors, strict=True) if t is None]
        if pairs:
            torch._foreach_copy_([v for v, _ in pairs], [t for _, t in pairs])
        if missing:
            torch._foreach_zero_(missing)

    @torch.no_grad()
    def grad_reductions(
        self, grads: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor sums of squares and non-finite counts of ``grads`` (float64 [P]); may
        use the buffer as scratch (:meth:`take` refills it)."""
        grads = self._in_order(list(grads))
        native = self._native(grads)
        if native is not None:
            return native.squares(grads)
        self.load(grads)
        g_sq, nonfinite = self._phases["grads"]()
        return g_sq, nonfinite

    @torch.no_grad()
    def take(self) -> torch.Tensor:
        """Copy the parameters in; returns their per-tensor sums of squares (float64 [P])."""
        current = self._current()
        native = self._native(current)
        if native is not None:
            return native.copy_squares(current, self._buffer())
        self._buffer()  # allocated here, never inside a graph capture
        result: torch.Tensor = self._phases["take"]()
        return result

    @torch.no_grad()
    def delta(self, grads: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Per-tensor :data:`~gradflow.kernels.DELTA_COLUMNS` of ``d = W_then - W_now``
        (float64 [P] each): ``g_dot_d`` with ``grads`` (dense; ``None`` counts 0), NaN
        without. May overwrite the copy: call :meth:`take` before reuse."""
        current = self._current()
        given = [None] * len(current) if grads is None else self._in_order(list(grads))
        native = self._native([*current, *given])
        if native is not None:
            columns = native.delta(self._views, current, given)
        else:
            d_sq, d_abs, d_max = self._phases["delta"]()
            # Gradients move between steps: multiplied in eagerly, outside any graph.
            columns = [d_sq, d_abs, self._dot(given), d_max]
        if grads is None:
            columns[DELTA_COLUMNS.index("g_dot_d")] = torch.full_like(columns[0], math.nan)
        return columns

    @torch.no_grad()
    def sparse_dot(self, j: int, grad: torch.Tensor) -> torch.Tensor:
        """The sum of ``grad * d`` of tensor ``j`` for a sparse ``grad``, over the entries it
        holds (float64, 0-d); call before :meth:`delta`, which may overwrite the copy."""
        g = grad.coalesce()
        at = tuple(g.indices())
        then, now = self._views[j], local(self._current()[j])
        order = None if self._orders is None else self._orders[j]
        if order is not None:  # back to the dimensions' own order, which the indices follow
            back = sorted(range(len(order)), key=order.__getitem__)
            then, now = then.permute(back), now.permute(back)
        d = then[at].double() - now[at].double()
        return (g.values().double() * d).sum()

    def _dot(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per-tensor sums of ``grad * d`` with the buffer holding ``d``; leaves the
        products there."""
        pairs = [(v, g) for v, g in zip(self._views, grads, strict=True) if g is not None]
        missing = [v for v, g in zip(self._views, grads, strict=True) if g is None]
        if pairs:
            torch._foreach_mul_([v for v, _ in pairs], [g for _, g in pairs])
        if missing:
            torch._foreach_zero_(missing)
        return self._per_tensor(self._rows.sum(1))[0]

    def _grad_stats(self) -> list[torch.Tensor]:
        rows = self._rows
        # NaN != NaN; the counts use boolean temporaries (a quarter of the buffer).
        bad = rows.ne(rows).sum(1) + rows.eq(math.inf).sum(1) + rows.eq(-math.inf).sum(1)
        return self._per_tensor(self._row_squares(), bad)

    def _take_stats(self) -> torch.Tensor:
        self.load(self._current())
        return self._per_tensor(self._row_squares())[0]

    def _delta_stats(self) -> list[torch.Tensor]:
        """``[d_sq, d_abs, d_max]``, leaving ``d`` in the buffer (for :meth:`_dot`)."""
        torch._foreach_sub_(self._views, self._current())
        rows = self._rows
        d_sq, d_abs = self._per_tensor(
            self._row_squares(), torch.linalg.vector_norm(rows, 1, dim=1)
        )
        # unsafe=True: the lengths are right by construction, and checking them would sync;
        # initial=0 is right for maxima of |d| (an empty tensor gives 0); NaN propagates.
        row_max = torch.linalg.vector_norm(rows, math.inf, dim=1).double()
        d_max = torch.segment_reduce(row_max, "max", lengths=self._lengths, unsafe=True, initial=0)
        return [d_sq, d_abs, d_max]
