"""The ``param`` probe: gradient, weight and update reductions of every layer's trainable
parameters, measured around each optimizer step."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.kernels import DELTA_COLUMNS, GRAD_COLUMNS, WEIGHT_COLUMNS
from gradflow.kernels.cpu import ParamKernels, param_kernels
from gradflow.kernels.device import Replayed
from gradflow.layers import LayerSpec
from gradflow.probes.base import Attachment, Block, Check, LayerMap, Probe, register

# Per parameter tensor, in packed order: the weights' and gradients' reductions before the
# step, then the update's (``d = W_before - W_after``, and its products with the gradient);
# the maxima last (summed over a layer's tensors and across shards: all but those).
COLUMNS = ("w_sq", "g_sq", "g_nonfinite", *DELTA_COLUMNS)
WIDTH = len(COLUMNS)
SUMMED = WIDTH - 1
assert COLUMNS[SUMMED:] == ("d_max",) and len(GRAD_COLUMNS) == 2 and len(WEIGHT_COLUMNS) == 1


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2, tensor parallel), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


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
    def delta(self, grads: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Per-tensor :data:`~gradflow.kernels.DELTA_COLUMNS` of ``d = W_then - W_now``
        (float64 [P] each): ``g_dot_d`` with ``grads`` (dense; ``None`` counts 0), NaN
        without. May overwrite the copy: call :meth:`take` before reuse."""
        current = self._current()
        given: Sequence[torch.Tensor | None] = [None] * len(current) if grads is None else grads
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
        d = self._views[j][at].double() - local(self._current()[j])[at].double()
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


Mark = tuple["weakref.ref[torch.Tensor]", int] | None


def _mark(grad: torch.Tensor | None) -> Mark:
    """The gradient tensor (weakly: a new one may take a freed one's id) and its in-place
    version."""
    return None if grad is None else (weakref.ref(grad), grad._version)


def _unchanged(grad: torch.Tensor | None, mark: Mark) -> bool:
    """Whether ``grad`` is the gradient ``mark`` was taken of, not changed in place since."""
    if mark is None or grad is None:
        return mark is None and grad is None
    return mark[0]() is grad and grad._version == mark[1]


def reduce_per_layer(
    vec: np.ndarray, layer_starts: np.ndarray, layer_numel: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-layer ``param``/``epoch`` reductions [..., L] (:data:`COLUMNS` and ``n``) from
    per-tensor vectors [..., WIDTH x P]: sums over a layer's tensors, maxima of ``d_max``."""
    parts = dict(zip(COLUMNS, np.moveaxis(vec.reshape(*vec.shape[:-1], WIDTH, -1), -2, 0),
                     strict=True))  # fmt: skip
    # A NaN non-finite count marks a parameter without a gradient (its g_sq is 0): a layer
    # has gradient statistics over those of its parameters that have one, NaN if none has.
    missing = np.isnan(parts["g_nonfinite"])
    parts["g_nonfinite"] = np.where(missing, 0.0, parts["g_nonfinite"])
    # A frozen layer has no tensors here (its start is the next one's): NaN, not measured.
    n_tensors = missing.shape[-1]
    measured = np.diff(np.append(layer_starts, n_tensors)) > 0
    starts = layer_starts[measured]
    shape = (*missing.shape[:-1], len(layer_starts))
    out: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        reduce = np.maximum if name == "d_max" else np.add
        out[name] = np.full(shape, np.nan)
        if len(starts):
            out[name][..., measured] = reduce.reduceat(parts[name], starts, axis=-1)
    out["n"] = np.broadcast_to(np.where(measured, layer_numel, np.nan), shape)
    if missing.any():
        none = np.full(shape, False)
        none[..., measured] = np.logical_and.reduceat(missing, starts, axis=-1)
        for name in ("g_sq", "g_nonfinite", "g_dot_d"):
            out[name] = np.where(none, np.nan, out[name])
    return out


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
        sums = (vec[: SUMMED * n].view(SUMMED, n) * self.weight).reshape(-1)
        maxima = vec[SUMMED * n :].clone()
        self._dist.all_reduce(sums, op=self._dist.ReduceOp.SUM, group=self.group)
        self._dist.all_reduce(maxima, op=self._dist.ReduceOp.MAX, group=self.group)
        return torch.cat([sums, maxima])


class ParamReductions:
    """Gradient, weight and update reductions of every layer's trainable parameters.

    Parameters are split into groups, one per optimizer (``owners[i]``: the group of the
    i-th parameter in layer order); each group is measured around its own optimizer's step.
    A group holds one float32 snapshot of its parameters, allocated at the first recorded
    step and reused, with ``W_before``; after the step it is turned into
    ``W_before - W_after`` in place (or read against ``W_after`` by the C kernels), so
    measuring the update needs no second copy; the gradients, which ``step()`` leaves in
    place, are read again for the update's products with them. Sharded parameters are
    measured on their local shards and completed across ranks by a :class:`ShardReducer`.
    Sparse gradients are measured by their coalesced values.
    """

    def __init__(self, layers: Sequence[LayerSpec], owners: Sequence[int] | None = None) -> None:
        self.params: list[nn.Parameter] = [p for lay in layers for p in lay.params]
        devices = {local(p).device for p in self.params}
        if len(devices) > 1:
            raise GradflowError(
                f"parameters on several devices ({sorted(map(str, devices))}) are not supported"
            )
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        owner = np.zeros(len(self.params), np.int64) if owners is None else np.asarray(owners)
        if len(owner) != len(self.params):
            raise ValueError(f"{len(owner)} owners for {len(self.params)} parameters")
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
        sharded = any(hasattr(p, "device_mesh") for p in self.params)
        self.reduce_shards = ShardReducer(self.params) if sharded else None
        self._pre: dict[int, list[torch.Tensor]] = {}
        self._marks: dict[int, list[Mark]] = {}
        self._done: dict[int, torch.Tensor] = {}
        self._missing: dict[tuple[int, ...], torch.Tensor] = {}

    def grad_reductions(self, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor sum of squares and non-finite count of one group's gradients
        (float64 [P_group])."""
        snapshot = self.snapshots[group]
        assert snapshot is not None
        grads, sparse = self._grads(group)
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

    def _grads(self, group: int) -> tuple[list[torch.Tensor | None], dict[int, torch.Tensor]]:
        """One group's gradients (local shards) and, by position, those that are sparse."""
        snapshot = self.snapshots[group]
        assert snapshot is not None
        if self.reduce_shards is None:
            grads = [p.grad for p in snapshot.params]
        else:
            grads = [local(p.grad) if p.grad is not None else None for p in snapshot.params]
        sparse = {
            j: g for j in self._maybe_sparse[group] if (g := grads[j]) is not None and g.is_sparse
        }
        return grads, sparse

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
        self._marks[group] = [_mark(p.grad) for p in snapshot.params]

    def after_step(self, group: int = 0, stepped: bool = True, has_update: bool = True) -> None:
        """Reduce ``W_before - W_after`` of a group measured by :meth:`before_step` (0 where
        its step was skipped, NaN where no optimizer step is measured)."""
        pre = self._pre.pop(group, None)
        marks = self._marks.pop(group, [])
        snapshot = self.snapshots[group]
        if pre is None or snapshot is None:
            return
        if not has_update:
            deltas = [torch.full_like(pre[0], math.nan)] * len(DELTA_COLUMNS)
        elif not stepped:
            deltas = [torch.zeros_like(pre[0])] * len(DELTA_COLUMNS)
        else:
            deltas = self._update(group, snapshot, marks)
        self._done[group] = torch.cat([*pre, *deltas])

    def _update(self, group: int, snapshot: Snapshot, marks: Sequence[Mark]) -> list[torch.Tensor]:
        """The update columns of one group, with the gradients its optimizer stepped on, which
        ``step()`` leaves in place; NaN products for a parameter whose gradient the step
        replaced or changed (a closure evaluated again, as LBFGS does): the gradient
        measured before the step is gone."""
        grads, sparse = self._grads(group)
        changed = tuple(
            j for j, (p, mark) in enumerate(zip(snapshot.params, marks, strict=True))
            if not _unchanged(p.grad, mark)
        )  # fmt: skip
        if not sparse and not changed:
            return snapshot.delta(grads)
        # Sparse products are taken before delta(), which may overwrite the copy.
        dots = {j: snapshot.sparse_dot(j, g) for j, g in sparse.items() if j not in changed}
        skipped = {*sparse, *changed}
        columns = snapshot.delta([None if j in skipped else g for j, g in enumerate(grads)])
        at = DELTA_COLUMNS.index("g_dot_d")
        column = columns[at].clone()
        for j, dot in dots.items():
            column[j] = dot
        if changed:
            column = column.index_fill(0, self._positions(changed), math.nan)
        columns[at] = column
        return columns

    def row(self) -> torch.Tensor | None:
        """All reductions measured since the last row as one float64 vector [WIDTH x P]
        (NaN for parameters whose optimizer did not step), or None if nothing was
        measured."""
        done, self._done = self._done, {}
        self._pre, self._marks = {}, {}
        if not done:
            return None
        if self._whole:
            return self.complete(done[0])
        full = torch.full(
            (WIDTH, len(self.params)), math.nan, dtype=torch.float64, device=self.device
        )
        for group, vec in done.items():
            full[:, self._index[group]] = vec.double().view(WIDTH, -1)
        return self.complete(full.reshape(-1))

    def complete(self, vec: torch.Tensor) -> torch.Tensor:
        """Per-tensor reductions made global across shards (if any), as float64."""
        if self.reduce_shards is not None:
            vec = self.reduce_shards(vec)
        return vec.double()


@register
class ParamProbe(Probe):
    """Per layer: the sums of squares of the weights and gradients and the gradients'
    non-finite entries before each optimizer step, and sum of squares, sum and maximum of
    the update's magnitude around it and its products with the gradient (see
    :class:`ParamReductions`)."""

    name = "param"
    scope = "step"
    columns = COLUMNS

    def __init__(self) -> None:
        self.reductions: ParamReductions | None = None

    def attach(self, attachment: Attachment) -> None:
        self.reductions = ParamReductions(attachment.layers, attachment.owners)

    def detach(self) -> None:
        self.reductions = None

    def before_step(self, group: int) -> None:
        if self.reductions is not None:
            self.reductions.before_step(group)

    def after_step(self, group: int, stepped: bool, has_update: bool) -> None:
        if self.reductions is not None:
            self.reductions.after_step(group, stepped, has_update)

    def pack(self) -> tuple[torch.Tensor, Block] | None:
        vec = self.reductions.row() if self.reductions is not None else None
        return None if vec is None else (vec, Block(vec.numel()))

    @classmethod
    def unpack(
        cls, packed: np.ndarray, blocks: Sequence[Block], layers: LayerMap
    ) -> dict[str, np.ndarray]:
        return reduce_per_layer(packed, layers.layer_starts, layers.layer_numel)

    @classmethod
    def nonfinite(cls, reductions: Mapping[str, np.ndarray]) -> list[Check]:
        # The weights the forward used come first in a step, the gradients last.
        return [
            Check(0, "weight", ~np.isfinite(reductions["w_sq"][0])),
            Check(3, "gradient", reductions["g_nonfinite"][0] > 0, last_first=True),
        ]
