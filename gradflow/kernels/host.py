"""Per-call reductions on the host: each layer output or output gradient reduced into a row
of :class:`HostRows` by the C kernels of :mod:`gradflow.kernels.cpu` (dense float32 and
bfloat16 tensors, in one call), others by a few torch operations."""

from __future__ import annotations

import math

import numpy as np
import torch

from gradflow.kernels import cpu
from gradflow.kernels.cpu import ReduceInto

# Entries below which a per-call reduction keeps the GIL (256 KB: ~20 us of reading).
HOLD_GIL_BELOW = 1 << 16


class HostRows:
    """Per-call float64 rows of ``width`` columns, written in place (the C kernels write at
    :attr:`address`); grown by doubling."""

    __slots__ = ("address", "array", "n", "stride", "width")

    def __init__(self, width: int, capacity: int = 64) -> None:
        self.width = width
        self.array = np.empty((capacity, width))
        self.n = 0
        self.address = self.array.ctypes.data
        self.stride = 8 * width  # bytes per row

    def claim(self) -> int:
        """The index of a new row (to be filled by the caller)."""
        n = self.n
        if n == len(self.array):
            self._grow(n + 1)
        self.n = n + 1
        return n

    def extend(self, values: np.ndarray) -> None:
        """Append ``values`` (``[rows x width]``) as new rows."""
        n = self.n + len(values)
        if n > len(self.array):
            self._grow(n)
        self.array[self.n : n] = values
        self.n = n

    def _grow(self, rows: int) -> None:
        """Room for at least ``rows`` rows, doubling the capacity at least."""
        grown = np.empty((max(rows, 2 * len(self.array)), self.width))
        grown[: self.n] = self.array[: self.n]
        self.array = grown
        self.address = grown.ctypes.data

    @property
    def rows(self) -> np.ndarray:
        return self.array[: self.n]

    def tensor(self) -> torch.Tensor:
        """The rows as one float64 vector (a copy: the rows are reused)."""
        return torch.from_numpy(self.rows.reshape(-1).copy())


def dense(x: torch.Tensor) -> bool:
    """Whether ``x`` fills one block of memory in a channels-last order (as convolutions on
    the CPU often produce): the call reductions do not depend on the order of the entries,
    so the kernels read such a tensor in place, as a contiguous one."""
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def _accumulator(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to reduce ``dtype`` in: float32 for half types (whose sums overflow)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a detached tensor, accumulated in float32 or wider.

    Squares, then torch's cascaded sum (~1e-7 at any size and order); a BLAS dot or a
    norm accumulates sequentially in float32, which drifts by ~1e-5 once a large entry
    comes early (and with the thread count), for no gain in speed.
    """
    flat = x.reshape(-1)
    acc = _accumulator(x.dtype)
    return torch.square(flat if acc is None else flat.to(acc)).sum()


class HostReducer:
    """Writes :data:`~gradflow.kernels.CALL_COLUMNS` (or only ``sum_sq``, for
    ``squares_only``) of CPU tensors into :class:`HostRows`: dense float32 and bfloat16
    tensors through the one-pass C kernels (one call, no Python objects made), others
    through a few torch operations each. Hooks call this hundreds of times per step, hence
    the lean code."""

    def __init__(self, squares_only: bool = False, native: bool = True) -> None:
        self.squares_only = squares_only
        self.native = native
        self._kernel: ReduceInto | None = None
        self._held: ReduceInto | None = None  # the same kernel, keeping the GIL
        self._bf16: tuple[ReduceInto | None, ReduceInto | None] = (None, None)  # the same pair
        self._resolved = False
        self._scratch = torch.empty(0)
        self._slices: dict[int, torch.Tensor] = {}

    def _resolve(self) -> ReduceInto | None:
        # Loaded (or built into the user cache) at the first CPU call, never for accelerator runs.
        if self.native:
            self._kernel = cpu.kernel(squares_only=self.squares_only)
            self._held = cpu.kernel(squares_only=self.squares_only, hold_gil=True)
            self._bf16 = (
                cpu.kernel(squares_only=self.squares_only, dtype=torch.bfloat16),
                cpu.kernel(squares_only=self.squares_only, hold_gil=True, dtype=torch.bfloat16),
            )
        self._resolved = True
        return self._kernel

    def __call__(self, x: torch.Tensor, rows: HostRows) -> None:
        """Fill a new row of ``rows``."""
        i = rows.claim()
        reduce = self._kernel if self._resolved else self._resolve()
        dtype = x.dtype
        if (
            reduce is not None
            and (dtype is torch.float32 or dtype is torch.bfloat16)
            and (x.is_contiguous() or dense(x))
        ):
            held = self._held
            if dtype is torch.bfloat16:
                reduce, held = self._bf16
            n = x.numel()
            # Tensors this small take microseconds: the GIL stays; larger ones let the
            # writer thread run meanwhile.
            if n < HOLD_GIL_BELOW and held is not None:
                reduce = held
            assert reduce is not None  # loaded from one library with the float32 kernels
            reduce(x.data_ptr(), n, rows.address + rows.stride * i)
        elif self.squares_only:
            rows.array[i, 0] = float(sum_of_squares(x.detach()))
        else:
            rows.array[i] = self.torch_reductions(x.detach())

    def _scratch_of(self, n: int) -> torch.Tensor:
        view = self._slices.get(n)
        if view is None:
            if self._scratch.numel() < n:
                self._scratch = torch.empty(n)
                self._slices.clear()
            view = self._slices[n] = self._scratch[:n]
        return view

    def torch_reductions(self, x: torch.Tensor) -> list[float]:
        """The four columns by torch operations (any dtype, any layout)."""
        flat = x.reshape(-1)
        n = flat.numel()
        sum_sq = float(sum_of_squares(x))
        # Bool reductions are slow on the CPU; a reused float 0/1 buffer sums vectorised,
        # exactly while partial sums stay below 2**24.
        is_zero = torch.eq(flat, 0, out=self._scratch_of(n))
        zeros = float(is_zero.sum(dtype=torch.float64) if n > 2**24 else is_zero.sum())
        # A finite sum of squares means no NaN/Inf entries; x - x is NaN exactly there.
        nonfinite = 0 if math.isfinite(sum_sq) else int(torch.count_nonzero(flat - flat))
        total = float(flat.sum(dtype=torch.float64 if x.dtype != torch.float32 else None))
        if n and math.isfinite(sum_sq) and 2.0 * total * total > n * sum_sq:
            # Far from zero, sum_sq / n - mean^2 would cancel the float32 sums' rounding
            # into the variance: the sums of y = x - x0 (x0 near the mean), rebuilt in float64.
            work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
            x0 = work.new_tensor(total / n)
            y = work - x0
            s_y, shift = float(y.sum()), float(x0)
            total = s_y + n * shift
            # torch's cascaded sum: 1e-7 where a float32 dot drifts to 1e-6
            q_y = float(torch.square(y, out=y).sum())
            sum_sq = q_y + 2.0 * shift * s_y + n * shift * shift
        return [total, sum_sq, n - zeros, float(nonfinite)]
