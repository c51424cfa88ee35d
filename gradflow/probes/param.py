"""The ``param`` probe: gradient, weight and update reductions of every layer's trainable
parameters, measured around each optimizer step."""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.kernels import DELTA_COLUMNS, GRAD_COLUMNS, WEIGHT_COLUMNS
from gradflow.layers import LayerSpec
from gradflow.probes.base import Attachment, Block, Check, LayerMap, Probe, register
from gradflow.probes.snapshot import Snapshot, local

# Per parameter tensor, in packed order: the weights' and gradients' reductions before the
# step, then the update's (``d = W_before - W_after``, and its products with the gradient);
# the maxima last (summed over a layer's tensors and across shards: all but those).
COLUMNS = ("w_sq", "g_sq", "g_nonfinite", *DELTA_COLUMNS)
WIDTH = len(COLUMNS)
SUMMED = WIDTH - 1
assert COLUMNS[SUMMED:] == ("d_max",) and len(GRAD_COLUMNS) == 2 and len(WEIGHT_COLUMNS) == 1


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
