"""What is measured where: layers, their parameters, their outputs and output gradients.

Every probe computes only *reductions* on the device (sums, sums of squares, counts,
see :mod:`gradflow.statistics`), never calls ``.item()``, and leaves them as tensors for
the recorder to pack into one host copy per recorded step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from gradflow.errors import GradflowError
from gradflow.fused import Launch, reducer
from gradflow.native import ParamKernels, kernel, param_kernels
from gradflow.store import Layer

PARAM_REDUCTIONS = ("w_sq", "g_sq", "g_nonfinite", "d_sq", "d_abs", "d_max")
ACTIVATION_REDUCTIONS = ("sum", "sum_sq", "nonzero", "nonfinite")

_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.modules.batchnorm._BatchNorm, "bn"),
    (nn.GroupNorm, "gn"),
    (nn.LayerNorm, "ln"),
    (nn.modules.instancenorm._InstanceNorm, "in"),
    (nn.Embedding, "embedding"),
    (nn.MultiheadAttention, "attention"),
)


def layer_kind(module: nn.Module) -> str:
    """A short kind for a module: conv, linear, bn, gn, ln, in, embedding, attention, other."""
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return "other"


@dataclass
class LayerSpec:
    """A module that directly owns trainable parameters, with those parameters."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    reg_index: int
    depth: int = -1

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def info(self, index: int) -> Layer:
        shape = "+".join("x".join(str(s) for s in p.shape) or "1" for p in self.params)
        return Layer(
            index=index,
            name=self.name or "(root)",
            kind=layer_kind(self.module),
            type=type(self.module).__name__,
            depth=self.depth,
            n_params=self.n_params,
            shape=shape,
        )


def discover_layers(model: nn.Module, keep: frozenset[int] = frozenset()) -> list[LayerSpec]:
    """Layers in registration order; a tied parameter belongs to its first owner only.

    A parametrized module (``torch.nn.utils.parametrize``: ``weight_norm``,
    ``spectral_norm``, ...) owns the parameters its parametrized tensors are computed from
    (``parametrizations.weight.original0`` ...), before its own. Parameters that do not
    require gradients are left out unless their id is in ``keep``. Names are those of the
    eager model (:func:`eager_name`).
    """
    seen: set[int] = set()
    layers: list[LayerSpec] = []
    for name, module in model.named_modules():
        name = eager_name(name)
        params = []
        owned = list(module.parameters(recurse=False))
        if parametrize.is_parametrized(module):
            owned = [*module.parametrizations.parameters(), *owned]
        for p in owned:
            if (p.requires_grad or id(p) in keep) and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if params:
            layers.append(LayerSpec(name, module, params, reg_index=len(layers)))
    return layers


def eager_name(name: str) -> str:
    """A module name as in the eager model: without the ``_orig_mod`` component that a
    submodule compiled in place (``model.blk = torch.compile(model.blk)``) adds."""
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def order_by_first_call(layers: Sequence[LayerSpec], call_order: dict[str, int]) -> list[LayerSpec]:
    """Sort layers by the first call of themselves or, if never called, their nearest called
    ancestor below the model (so ``attn.out_proj``, used functionally, sits right after
    ``attn``); layers with neither go last."""

    def key(lay: LayerSpec) -> tuple[float, int]:
        name = lay.name
        while True:
            if name in call_order and (name or not lay.name):
                own = name == lay.name
                return (call_order[name] + (0.0 if own else 0.5), lay.reg_index)
            if not name:
                return (float("inf"), lay.reg_index)
            name = name.rpartition(".")[0]

    ordered = sorted(layers, key=key)
    for depth, lay in enumerate(ordered):
        lay.depth = depth
    return ordered


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a module output (tensor, tuple, list, dict or
    dataclass, e.g. a transformers ``ModelOutput``)."""
    return next(floating_tensors(output), None)


def floating_tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module output, in order (see :func:`first_tensor`)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
        return
    if isinstance(output, (tuple, list)):
        items = list(output)
    elif isinstance(output, dict):
        items = list(output.values())
    elif is_dataclass(output) and not isinstance(output, type):
        items = [getattr(output, f.name) for f in fields(output)]
    else:
        return
    for item in items:
        yield from floating_tensors(item)


class HostRows:
    """Per-call float64 rows ``[sum, sum of squares, zeros, non-finite]`` of CPU tensors,
    written in place (the C kernel writes at :attr:`address`); grown by doubling."""

    __slots__ = ("address", "array", "n")
    WIDTH = 4

    def __init__(self, capacity: int = 64) -> None:
        self.array = np.empty((capacity, self.WIDTH))
        self.n = 0
        self.address = self.array.ctypes.data

    def claim(self) -> int:
        """The index of a new row (to be filled by the caller)."""
        n = self.n
        if n == len(self.array):
            self.array = np.concatenate([self.array, np.empty_like(self.array)])
            self.address = self.array.ctypes.data
        self.n = n + 1
        return n

    @property
    def rows(self) -> np.ndarray:
        return self.array[: self.n]


class DeviceRows:
    """Per-call float64 reductions on an accelerator, written in place (one stack of
    hundreds of 0-d tensors would cost a copy call each): by the reductions' ``out=``, or
    by ``fused`` (:func:`gradflow.fused.reducer`), which adds into zeroed rows."""

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


@dataclass
class CallLog:
    """Per-call activation and output-gradient reductions of one recorded step.

    On the CPU they are host numbers already (reading them costs no sync), in
    :class:`HostRows`; on accelerators they stay on the device, in :class:`DeviceRows`.
    """

    act_ids: list[int] = field(default_factory=list)
    act_n: list[int] = field(default_factory=list)
    act_host: HostRows = field(default_factory=HostRows)
    act_device: DeviceRows | None = None  # sum, norm, nonzero, nonfinite
    gout_ids: list[int] = field(default_factory=list)
    gout_n: list[int] = field(default_factory=list)
    gout_host: HostRows = field(default_factory=HostRows)  # column 1: the sum of squares
    gout_device: DeviceRows | None = None  # norm per call
    hook_s: float = 0.0  # seconds spent in output-gradient hooks (backward)
    reduced: torch.Tensor | None = None  # set by all_reduce: tensors(), summed over ranks

    def all_reduce(self, world_size: int, group: Any = None) -> CallLog:
        """The same calls with reductions summed over all ranks (identical call patterns)."""
        import torch.distributed as dist

        out = CallLog(
            act_ids=self.act_ids,
            act_n=[n * world_size for n in self.act_n],
            gout_ids=self.gout_ids,
            gout_n=[n * world_size for n in self.gout_n],
            hook_s=self.hook_s,
        )
        parts = self.tensors()
        if parts:  # one collective for everything, in float64 (exact for counts)
            out.reduced = torch.cat(parts)
            dist.all_reduce(out.reduced, group=group)
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The reductions as float64 vectors: activations [C, 4] (sum, sum of squares,
        nonzero and non-finite entries) then output-gradient sums of squares [C']."""
        if self.reduced is not None:
            return [self.reduced]
        return [t for t in (self._activations(), self._output_grads()) if t is not None]

    def _activations(self) -> torch.Tensor | None:
        if self.act_host.n:
            act = self.act_host.rows.copy()
            act[:, 2] = np.asarray(self.act_n, np.float64) - act[:, 2]  # zeros -> nonzero
            return torch.from_numpy(act.reshape(-1))
        if self.act_device is not None:
            act_t = self.act_device.rows
            if self.act_device.fused is None:
                act_t = act_t.clone()
                act_t[:, 1].square_()  # norms on the device, sums of squares from here on
            return act_t.reshape(-1)
        return None

    def _output_grads(self) -> torch.Tensor | None:
        if self.gout_host.n:
            return torch.from_numpy(self.gout_host.rows[:, 1].copy())
        if self.gout_device is not None:
            return self.gout_device.rows[:, 0].square()
        return None

    @staticmethod
    def merged(logs: Sequence[CallLog]) -> CallLog:
        """The calls of several logs (in order) as one log."""
        used = [log for log in logs if log.act_ids or log.gout_ids]
        if len(used) <= 1:
            return used[0] if used else CallLog(hook_s=sum(log.hook_s for log in logs))
        out = CallLog(
            act_ids=[i for log in used for i in log.act_ids],
            act_n=[n for log in used for n in log.act_n],
            gout_ids=[i for log in used for i in log.gout_ids],
            gout_n=[n for log in used for n in log.gout_n],
            hook_s=sum(log.hook_s for log in logs),
        )
        acts = [a for log in used if (a := log._activations()) is not None]
        gouts = [g for log in used if (g := log._output_grads()) is not None]
        out.reduced = torch.cat([t.to(used[0].device()) for t in acts + gouts])
        return out

    def device(self) -> torch.device:
        """Where the reductions are (the CPU for host rows)."""
        rows = self.act_device or self.gout_device
        return rows.device if rows is not None else torch.device("cpu")


def _accumulator(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to reduce ``dtype`` in: float32 for half types (whose sums overflow)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of a detached tensor, accumulated in float32 or wider.

    One BLAS dot while that is accurate (float32 dots drift by ~1e-5 at a few million
    entries, ~3e-7 up to 2**18); beyond, or for half types, norms of rows of 4096
    entries first, then the norm of those (~1e-7 at any size).
    """
    flat = x.reshape(-1)
    if flat.numel() <= 2**18 and x.dtype in (torch.float32, torch.float64):
        return torch.dot(flat, flat)
    acc = _accumulator(x.dtype)
    whole = flat.numel() // 4096 * 4096
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, 4096), dim=1, dtype=acc)
    rest = torch.linalg.vector_norm(flat[whole:], dtype=acc).reshape(1)
    return torch.linalg.vector_norm(torch.cat([rows, rest])).square()


class HostReducer:
    """Writes ``[sum, sum of squares, zeros, non-finite]`` of CPU tensors into
    :class:`HostRows`: contiguous float32 tensors through the one-pass kernel of
    :mod:`gradflow.native` (one call, no Python objects made), others through a few
    torch operations each. Hooks call this hundreds of times per step, hence the lean code."""

    def __init__(self, native: bool = True) -> None:
        self.native = native
        self._kernels: tuple[Any, Any] = (None, None)
        self._resolved = False
        self._scratch = torch.empty(0)
        self._slices: dict[int, torch.Tensor] = {}

    def _resolve(self) -> tuple[Any, Any]:
        # Loaded (or built into the user cache) at the first CPU call, never for accelerator runs.
        if self.native:
            self._kernels = (kernel(), kernel(squares_only=True))
        self._resolved = True
        return self._kernels

    def __call__(self, x: torch.Tensor, rows: HostRows, squares_only: bool = False) -> None:
        """Fill a new row of ``rows`` (only its sum of squares if ``squares_only``)."""
        i = rows.claim()
        reduce = (self._kernels if self._resolved else self._resolve())[squares_only]
        if reduce is not None and x.dtype is torch.float32 and x.is_contiguous():
            reduce(x.data_ptr(), x.numel(), rows.address + 8 * HostRows.WIDTH * i)
        elif squares_only:
            rows.array[i, 1] = float(sum_of_squares(x.detach()))
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
        """The same four numbers by torch operations (any dtype, any layout)."""
        flat = x.reshape(-1)
        n = flat.numel()
        sum_sq = float(sum_of_squares(x))
        # Bool reductions are slow on the CPU; a reused float 0/1 buffer sums vectorised,
        # exactly while partial sums stay below 2**24.
        is_zero = torch.eq(flat, 0, out=self._scratch_of(n))
        zeros = is_zero.sum(dtype=torch.float64) if n > 2**24 else is_zero.sum()
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
        return [total, sum_sq, float(zeros), float(nonfinite)]


class ActivationProbe:
    """Sum, sum of squares, nonzero and non-finite counts of layer outputs: on the CPU by a
    :class:`HostReducer`, on accelerators by a few device reductions (no host sync)."""

    def __init__(self, host: HostReducer | None = None) -> None:
        self.host = host if host is not None else HostReducer()

    @staticmethod
    def device(x: torch.Tensor, log: CallLog) -> None:
        """``[sum, sum of squares, nonzero, nonfinite]`` into a new row of
        ``log.act_device``, no host sync: on CUDA with Triton one fused kernel
        (:mod:`gradflow.fused`); elsewhere torch kernels accumulating in float64, the sums
        those of x less its first entry, the second a norm (squared when read), counts as 0-norms
        (``x * 0`` is NaN exactly where ``x`` is NaN or Inf; ``count_nonzero`` would copy
        its count to the host)."""
        rows = log.act_device
        if rows is None:
            rows = log.act_device = DeviceRows(x.device, 4, reducer(x.device))
        if rows.fused is not None:
            chunk, i = rows.next_row()
            rows.fused(x, chunk, i)
            return
        total, norm, nonzero, nonfinite = rows.claim()
        flat = x.detach().reshape(-1)
        f64 = torch.float64
        # Sums of y = x - x0 (x0: the first entry, 0 if not finite), rebuilt in float64:
        # else sum_sq / n - mean^2 would cancel the rounding of the sums into the variance,
        # far from zero. One entry, not the mean: a pass less over x.
        work = flat if flat.dtype in (torch.float32, f64) else flat.float()
        x0 = torch.nan_to_num(work[:1].sum(), nan=0.0, posinf=0.0, neginf=0.0)
        y = work - x0
        s_y, q_y = torch.sum(y, 0, dtype=f64), torch.linalg.vector_norm(y, dtype=f64).square()
        shift, n = x0.to(f64), flat.numel()
        torch.add(s_y, n * shift, out=total)
        # y has x's NaN and Inf entries: then its sums are x's
        rebuilt = q_y + 2.0 * shift * s_y + n * shift * shift
        torch.where(s_y.isfinite() & q_y.isfinite(), rebuilt, q_y, out=norm).sqrt_()
        torch.linalg.vector_norm(flat, 0, dtype=f64, out=nonzero)
        torch.linalg.vector_norm(flat * 0, 0, dtype=f64, out=nonfinite)

    def __call__(self, x: torch.Tensor, log: CallLog, layer_id: int) -> None:
        """Append the reductions of ``x`` (one layer call) to ``log``."""
        if x.is_cpu:
            self.host(x, log.act_host)
        else:
            self.device(x, log)
        log.act_ids.append(layer_id)
        log.act_n.append(x.numel())


def grad_output_hook(
    log: Callable[[], CallLog], layer_id: int, host: HostReducer
) -> Callable[[torch.Tensor], None]:
    """A tensor hook appending the sum of squares of the gradient w.r.t. a layer's output."""

    def hook(grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        target = log()
        if grad.is_cpu:
            host(grad, target.gout_host, squares_only=True)
        else:
            if target.gout_device is None:
                target.gout_device = DeviceRows(grad.device, 1)
            (norm,) = target.gout_device.claim()
            torch.linalg.vector_norm(grad.detach(), dtype=torch.float64, out=norm)
        target.gout_ids.append(layer_id)
        target.gout_n.append(grad.numel())
        target.hook_s += time.perf_counter() - t0

    # Eager even where backward is traced (compiled autograd): it reads host memory.
    disabled: Callable[[torch.Tensor], None] = torch.compiler.disable(hook)
    return disabled


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


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
        self, params: Sequence[nn.Parameter], device: torch.device, graphs: bool = False
    ) -> None:
        self.params = list(params)
        self.device = device
        sharded = any(hasattr(p, "device_mesh") for p in self.params)
        # Plain parameters are read as they are (under no_grad): no per-step wrappers.
        self._sources: list[torch.Tensor] | None = None if sharded else list(self.params)
        self._shapes = [local(p).shape for p in self.params]
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
        return self._sources if self._sources is not None else [local(p) for p in self.params]

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
    def delta(self) -> list[torch.Tensor]:
        """Per-tensor ``[sum d^2, sum |d|, max |d|]`` of ``d = W_then - W_now`` (3 x float64
        [P]); may turn the copy into ``|d|`` in place: call :meth:`take` before reuse."""
        current = self._current()
        native = self._native(current)
        if native is not None:
            return native.delta(self._views, current)
        result: list[torch.Tensor] = self._phases["delta"]()
        return result

    def _grad_stats(self) -> list[torch.Tensor]:
        rows = self._rows
        # NaN != NaN; the counts use boolean temporaries (a quarter of the buffer).
        bad = rows.ne(rows).sum(1) + rows.eq(math.inf).sum(1) + rows.eq(-math.inf).sum(1)
        return self._per_tensor(self._row_squares(), bad)

    def _take_stats(self) -> torch.Tensor:
        self.load(self._current())
        return self._per_tensor(self._row_squares())[0]

    def _delta_stats(self) -> list[torch.Tensor]:
        torch._foreach_sub_(self._views, self._current())
        d_sq = self._row_squares()
        rows = self._rows.abs_()
        d_sq, d_abs = self._per_tensor(d_sq, rows.sum(1))
        # unsafe=True: the lengths are right by construction, and checking them would sync;
        # initial=0 is right for maxima of |d| (an empty tensor gives 0); NaN propagates.
        d_max = torch.segment_reduce(
            rows.amax(1).double(), "max", lengths=self._lengths, unsafe=True, initial=0
        )
        return [d_sq, d_abs, d_max]


def reduce_per_layer(
    vec: np.ndarray, layer_starts: np.ndarray, layer_numel: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-layer ``param``/``epoch`` reductions from per-tensor vectors [..., 6P]
    (``sum W^2, sum g^2, non-finite g, sum d^2, sum |d|, max |d|``), as [..., L]."""
    parts = np.moveaxis(vec.reshape(*vec.shape[:-1], 6, -1), -2, 0)
    # A NaN non-finite count marks a parameter without a gradient (its g_sq is 0): a layer
    # has gradient statistics over those of its parameters that have one, NaN if none has.
    missing = np.isnan(parts[2])
    parts[2] = np.where(missing, 0.0, parts[2])
    names = ("w_sq", "g_sq", "g_nonfinite", "d_sq", "d_abs")
    sums = {
        name: np.add.reduceat(part, layer_starts, axis=-1)
        for name, part in zip(names, parts[:5], strict=True)
    }
    if missing.any():
        none = np.logical_and.reduceat(missing, layer_starts, axis=-1)
        sums["g_sq"] = np.where(none, np.nan, sums["g_sq"])
        sums["g_nonfinite"] = np.where(none, np.nan, sums["g_nonfinite"])
    return {"n": layer_numel, **sums, "d_max": np.maximum.reduceat(parts[5], layer_starts, axis=-1)}


class ShardReducer:
    """Completes per-tensor reductions of sharded (DTensor) parameters across ranks.

    Sums of sharded tensors are all-reduced with SUM (replicated ones are weighted by
    1/world so they count once), maxima with MAX: two collectives per recorded step,
    so norms are global, never shard-local.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        import torch.distributed as dist

        self._dist = dist
        mesh = next(p.device_mesh for p in params if hasattr(p, "device_mesh"))
        self.group = mesh.get_group() if mesh.ndim == 1 else None
        world = dist.get_world_size(self.group)
        sharded = [any(pl.is_shard() for pl in getattr(p, "placements", ())) for p in params]
        self.weight = torch.tensor(
            [1.0 if s else 1.0 / world for s in sharded], device=local(params[0]).device
        )

    def __call__(self, vec: torch.Tensor) -> torch.Tensor:
        n = len(self.weight)
        sums = (vec[: 5 * n].view(5, n) * self.weight).reshape(-1)
        maxima = vec[5 * n :].clone()
        self._dist.all_reduce(sums, op=self._dist.ReduceOp.SUM, group=self.group)
        self._dist.all_reduce(maxima, op=self._dist.ReduceOp.MAX, group=self.group)
        return torch.cat([sums, maxima])


class ParamProbe:
    """Gradient, weight and update reductions of every layer's trainable parameters.

    Parameters are split into groups, one per optimizer (``owners[i]``: the group of the
    i-th parameter in layer order); each group is measured around its own optimizer's step.
    A group holds one float32 snapshot of its parameters, allocated at the first recorded
    step and reused, with ``W_before``; after the step it is turned into
    ``W_before - W_after`` in place, so measuring the update needs no second copy. Sharded
    parameters are measured on their local shards and completed across ranks by a
    :class:`ShardReducer`. Sparse gradients are measured by their coalesced values.
    """

    def __init__(self, layers: Sequence[LayerSpec], owners: Sequence[int] | None = None) -> None:
        self.params: list[nn.Parameter] = [p for lay in layers for p in lay.params]
        counts = [len(lay.params) for lay in layers]
        self.layer_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.layer_numel = np.array([lay.n_params for lay in layers], dtype=np.float64)
        devices = {local(p).device for p in self.params}
        if len(devices) > 1:
            raise GradflowError(
                f"parameters on several devices ({sorted(map(str, devices))}) are not supported"
            )
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        owner = np.zeros(len(self.params), np.int64) if owners is None else np.asarray(owners)
        n_groups = int(owner.max()) + 1 if len(owner) else 1
        self._members = [np.flatnonzero(owner == k) for k in range(n_groups)]
        self._index = [torch.from_numpy(m).to(self.device) for m in self._members]
        self._whole = n_groups == 1
        self.snapshots = [
            Snapshot([self.params[i] for i in m], self.device, graphs=True) if len(m) else None
            for m in self._members
        ]
        self.snapshot = self.snapshots[0]
        # Only modules with sparse gradients (nn.Embedding/EmbeddingBag(sparse=True)) can
        # hand the optimizer sparse gradients: only their parameters are checked per step.
        sparse_modules = [lay for lay in layers if getattr(lay.module, "sparse", False) is True]
        sparse_ids = {id(p) for lay in sparse_modules for p in lay.params}
        self._maybe_sparse = [
            [j for j, i in enumerate(m) if id(self.params[i]) in sparse_ids] for m in self._members
        ]
        self.signature = self.current_signature()
        sharded = any(hasattr(p, "device_mesh") for p in self.params)
        self.reduce_shards = ShardReducer(self.params) if sharded else None
        self._pre: dict[int, list[torch.Tensor]] = {}
        self._done: dict[int, torch.Tensor] = {}
        self._missing: dict[tuple[int, ...], torch.Tensor] = {}

    def current_signature(self) -> list[tuple[Any, ...]]:
        """Shape, dtype and device of every parameter: a change means a new probe."""
        return [(p.shape, p.dtype, p.device) for p in self.params]

    def grad_reductions(self, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor sum of squares and non-finite count of one group's gradients
        (float64 [P_group])."""
        snapshot = self.snapshots[group]
        assert snapshot is not None
        params = snapshot.params
        if self.reduce_shards is None:
            grads = [p.grad for p in params]
        else:
            grads = [local(p.grad) if p.grad is not None else None for p in params]
        sparse = {
            j: g for j in self._maybe_sparse[group] if (g := grads[j]) is not None and g.is_sparse
        }
        if not sparse:
            g_sq, nonfinite = snapshot.grad_reductions(grads)
        else:
            dense = [None if j in sparse else g for j, g in enumerate(grads)]
            g_sq, nonfinite = (t.clone() for t in snapshot.grad_reductions(dense))
            for j, grad in sparse.items():
                values = grad.coalesce().values().detach()
                g_sq[j] = values.double().square().sum()
                nonfinite[j] = (~torch.isfinite(values)).sum()
        missing = tuple(j for j, g in enumerate(grads) if g is None)
        if missing:  # counted as NaN: no gradient is not a zero gradient
            nonfinite = nonfinite.index_fill(0, self._positions(missing), math.nan)
        return g_sq, nonfinite

    def _positions(self, positions: tuple[int, ...]) -> torch.Tensor:
        """``positions`` as an index tensor on the device (cached: the set of parameters
        without a gradient rarely changes, and a fresh copy to the device would sync)."""
        index = self._missing.get(positions)
        if index is None:
            index = self._missing[positions] = torch.tensor(positions, device=self.device)
        return index

    def before_step(self, group: int = 0) -> None:
        """Reduce one group's gradients and weights, and snapshot the weights (call before
        its optimizer's ``step()``)."""
        snapshot = self.snapshots[group]
        if snapshot is None:
            return
        g_sq, nonfinite = self.grad_reductions(group)
        self._pre[group] = [snapshot.take(), g_sq, nonfinite]

    def after_step(self, group: int = 0, stepped: bool = True) -> None:
        """Reduce ``W_after - W_before`` of a group measured by :meth:`before_step`."""
        pre = self._pre.pop(group, None)
        snapshot = self.snapshots[group]
        if pre is None or snapshot is None:
            return
        deltas = snapshot.delta() if stepped else [torch.zeros_like(pre[0])] * 3
        self._done[group] = torch.cat([*pre, *deltas])

    def row(self) -> torch.Tensor | None:
        """All reductions measured since the last row as one float64 vector [6P] (NaN for
        parameters whose optimizer did not step), or None if nothing was measured."""
        done, self._done = self._done, {}
        self._pre = {}
        if not done:
            return None
        if self._whole:
            return self.complete(done[0])
        full = torch.full((6, len(self.params)), math.nan, dtype=torch.float64, device=self.device)
        for group, vec in done.items():
            full[:, self._index[group]] = vec.double().view(6, -1)
        return self.complete(full.reshape(-1))

    def complete(self, vec: torch.Tensor) -> torch.Tensor:
        """Per-tensor reductions made global across shards (if any), as float64."""
        if self.reduce_shards is not None:
            vec = self.reduce_shards(vec)
        return vec.double()
