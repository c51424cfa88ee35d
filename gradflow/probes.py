"""What is measured where: layers, their parameters, their outputs and output gradients.

Every probe computes only *reductions* on the device (sums, sums of squares, counts,
see :mod:`gradflow.statistics`), never calls ``.item()``, and leaves them as tensors for
the recorder to pack into one host copy per recorded step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from gradflow.errors import GradflowError
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


def discover_layers(model: nn.Module) -> list[LayerSpec]:
    """Layers in registration order; a tied parameter belongs to its first owner only."""
    seen: set[int] = set()
    layers: list[LayerSpec] = []
    for name, module in model.named_modules():
        params = []
        for p in module.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if params:
            layers.append(LayerSpec(name, module, params, reg_index=len(layers)))
    return layers


def order_by_first_call(layers: Sequence[LayerSpec], call_order: dict[str, int]) -> list[LayerSpec]:
    """Sort layers by the first call of themselves or, if never called, their nearest called
    ancestor (so ``attn.out_proj``, used functionally, sits right after ``attn``)."""

    def key(lay: LayerSpec) -> tuple[float, int]:
        name = lay.name
        while True:
            if name in call_order:
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
    """The first floating-point tensor in a module output (tensor, tuple, list or dict)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        items = list(output)
    elif isinstance(output, dict):
        items = list(output.values())
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


@dataclass
class CallLog:
    """Per-call activation and output-gradient reductions of one recorded step."""

    act_ids: list[int] = field(default_factory=list)
    act_n: list[int] = field(default_factory=list)
    act_float: list[torch.Tensor] = field(default_factory=list)  # sum, sum_sq per call
    act_count: list[torch.Tensor] = field(default_factory=list)  # nonzero, nonfinite per call
    gout_ids: list[int] = field(default_factory=list)
    gout_n: list[int] = field(default_factory=list)
    gout_sq: list[torch.Tensor] = field(default_factory=list)
    hook_s: float = 0.0  # seconds spent in output-gradient hooks (backward)

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
            packed = torch.cat(parts)
            dist.all_reduce(packed, group=group)
            k = 4 * len(self.act_ids)
            act, gout = packed[:k].view(-1, 4), packed[k:]
            out.act_float, out.act_count = list(act[:, :2]), list(act[:, 2:])
            out.gout_sq = list(gout)
        return out

    def tensors(self) -> list[torch.Tensor]:
        """The reductions as float64 vectors: activations [C, 4] then output grads [C']."""
        out = []
        if self.act_ids:
            floats = torch.stack(self.act_float).reshape(-1, 2).double()
            counts = torch.stack(self.act_count).reshape(-1, 2).double()
            out.append(torch.cat([floats, counts], dim=1).reshape(-1))
        if self.gout_ids:
            out.append(torch.stack(self.gout_sq).double())
        return out


def activation_reductions(x: torch.Tensor, log: CallLog, layer_id: int) -> None:
    """Append sum, sum of squares, nonzero and non-finite counts of ``x`` to ``log``."""
    flat = x.detach().reshape(-1)
    sums = torch.stack([flat.sum(), torch.dot(flat, flat)])
    nonzero = flat.bool().sum()  # count_nonzero is many times slower on sparse CPU data
    if flat.device.type == "cpu" and bool(torch.isfinite(sums).all()):
        # On the CPU the check costs no device sync: finite sums mean no NaN/Inf entries.
        nonfinite = torch.zeros_like(nonzero)
    else:
        # x - x is 0 where finite and NaN elsewhere: one pass counts non-finite entries.
        nonfinite = torch.count_nonzero(flat - flat)
    log.act_float.append(sums)
    log.act_count.append(torch.stack([nonzero, nonfinite]))
    log.act_ids.append(layer_id)
    log.act_n.append(flat.numel())


def grad_output_hook(log: Callable[[], CallLog], layer_id: int) -> Callable[[torch.Tensor], None]:
    """A tensor hook appending the squared norm of the gradient w.r.t. a layer's output."""

    def hook(grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        flat = grad.detach().reshape(-1)
        target = log()
        target.gout_sq.append(torch.dot(flat, flat))
        target.gout_ids.append(layer_id)
        target.gout_n.append(flat.numel())
        target.hook_s += time.perf_counter() - t0

    return hook


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _sq_norms(tensors: Sequence[torch.Tensor], order: float = 2) -> torch.Tensor:
    norms = torch.stack(torch._foreach_norm(list(tensors), order)).float()
    return norms * norms if order == 2 else norms


class Snapshot:
    """A float32 copy of (the local shards of) parameters in one flat buffer."""

    def __init__(self, params: Sequence[nn.Parameter], device: torch.device) -> None:
        self.params = list(params)
        self.device = device
        sharded = any(hasattr(p, "device_mesh") for p in self.params)
        # Plain parameters are read as they are (under no_grad): no per-step wrappers.
        self._sources: list[torch.Tensor] | None = None if sharded else list(self.params)
        sizes = [local(p).numel() for p in self.params]
        self._sizes = sizes
        self._ends = torch.tensor(np.cumsum(sizes) - 1, device=device)
        self._flat = torch.empty(0)
        self._views: list[torch.Tensor] = []

    def _current(self) -> list[torch.Tensor]:
        return self._sources if self._sources is not None else [local(p) for p in self.params]

    def _buffer(self) -> list[torch.Tensor]:
        if not self._views:  # allocated at first use: unrecorded runs cost no memory
            self._flat = torch.empty(sum(self._sizes), dtype=torch.float32, device=self.device)
            shapes = [local(p).shape for p in self.params]
            self._views = [
                v.view(s) for v, s in zip(self._flat.split(self._sizes), shapes, strict=True)
            ]
        return self._views

    @torch.no_grad()
    def take(self) -> torch.Tensor:
        """Copy the parameters in; returns their per-tensor sums of squares (float32 [P])."""
        views = self._buffer()
        torch._foreach_copy_(views, self._current())
        return _sq_norms(views)

    @torch.no_grad()
    def nonfinite_counts(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Per-tensor counts of NaN/Inf entries (float32 [P]) in a few kernels whatever
        their number; ``None`` counts 0. Uses the buffer as scratch: :meth:`take` after."""
        views = self._buffer()
        pairs = [(v, t) for v, t in zip(views, tensors, strict=True) if t is not None]
        torch._foreach_copy_([v for v, _ in pairs], [t for _, t in pairs])
        bad = torch.cumsum(torch.isfinite(self._flat).logical_not_(), 0, dtype=torch.int32)
        totals = torch.cat([bad.new_zeros(1), bad[self._ends]])
        counts = (totals[1:] - totals[:-1]).float()
        missing = [i for i, t in enumerate(tensors) if t is None]
        if missing:
            counts[missing] = 0
        return counts

    @torch.no_grad()
    def delta(self) -> list[torch.Tensor]:
        """Turn the copy into ``W_then - W_now`` in place; returns per-tensor
        ``[sum d^2, sum |d|, max |d|]`` (3 x float32 [P]). Call :meth:`take` before reuse."""
        torch._foreach_sub_(self._views, self._current())
        return [_sq_norms(self._views, order) for order in (2, 1, float("inf"))]


def reduce_per_layer(
    vec: np.ndarray, layer_starts: np.ndarray, layer_numel: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-layer ``param``/``epoch`` reductions from the per-tensor vector [6P]
    (``sum W^2, sum g^2, non-finite g, sum d^2, sum |d|, max |d|``)."""
    w_sq, g_sq, nf, d_sq, d_abs, d_max = vec.reshape(6, -1)
    return {
        "n": layer_numel,
        "w_sq": np.add.reduceat(w_sq, layer_starts),
        "g_sq": np.add.reduceat(g_sq, layer_starts),
        "g_nonfinite": np.add.reduceat(nf, layer_starts),
        "d_sq": np.add.reduceat(d_sq, layer_starts),
        "d_abs": np.add.reduceat(d_abs, layer_starts),
        "d_max": np.maximum.reduceat(d_max, layer_starts),
    }


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

    One float32 snapshot of all trainable parameters, allocated at the first recorded step
    and reused, holds ``W_before``; after the step it is turned into ``W_before - W_after``
    in place, so measuring the update needs no second copy. Sharded parameters are
    measured on their local shards and completed across ranks by a :class:`ShardReducer`.
    """

    def __init__(self, layers: Sequence[LayerSpec]) -> None:
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
        self.snapshot = Snapshot(self.params, self.device)
        sharded = any(hasattr(p, "device_mesh") for p in self.params)
        self.reduce_shards = ShardReducer(self.params) if sharded else None
        self._zero = torch.zeros((), device=self.device)
        self._pre: list[torch.Tensor] = []

    @torch.no_grad()
    def grad_reductions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor sum of squares and non-finite count of the gradients (float32 [P])."""
        grads = [local(p.grad) if p.grad is not None else None for p in self.params]
        present = [g for g in grads if g is not None]
        sq: Iterator[torch.Tensor] = iter(_sq_norms(present) if present else [])
        g_sq = torch.stack([next(sq) if g is not None else self._zero for g in grads])
        if self.device.type == "cpu":
            # On the CPU a check costs no device sync; count exactly only when needed.
            if torch.isfinite(g_sq).all():
                return g_sq, torch.zeros_like(g_sq)
            counts = [
                (~torch.isfinite(g)).sum().float() if g is not None else self._zero for g in grads
            ]
            return g_sq, torch.stack(counts)
        # Elsewhere count unconditionally, through the snapshot buffer (weights come next).
        return g_sq, self.snapshot.nonfinite_counts(grads)

    def before_step(self) -> None:
        """Reduce gradients and weights, and snapshot the weights (call before ``step()``)."""
        g_sq, nonfinite = self.grad_reductions()
        self._pre = [self.snapshot.take(), g_sq, nonfinite]

    def after_step(self, stepped: bool = True) -> torch.Tensor:
        """Reduce ``W_after - W_before``; returns all reductions as one float64 vector [6P]."""
        w_sq = self._pre[0]
        deltas = self.snapshot.delta() if stepped else [torch.zeros_like(w_sq)] * 3
        return self.complete(torch.cat([*self._pre, *deltas]))

    def complete(self, vec: torch.Tensor) -> torch.Tensor:
        """Per-tensor reductions made global across shards (if any), as float64."""
        if self.reduce_shards is not None:
            vec = self.reduce_shards(vec)
        return vec.double()
