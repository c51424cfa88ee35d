"""Per-call probes' shared machinery: one row of named columns per layer call, kept where
the tensors are (host rows on the CPU, device rows on accelerators), packed per recorded
step and summed per layer on the host."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradflow.errors import GradflowError
from gradflow.kernels import CALL_COLUMNS
from gradflow.kernels import device as device_kernels
from gradflow.kernels.device import DeviceRows
from gradflow.kernels.host import HostReducer, HostRows
from gradflow.probes.base import Block, LayerMap, Probe

_HOST = torch.empty(0)  # stands for any CPU tensor in rows_for


class CallRows:
    """One call probe's rows in one log: the layer of each call, its size, its columns."""

    __slots__ = ("ids", "n", "rows")

    def __init__(self, rows: HostRows | DeviceRows) -> None:
        self.ids: list[int] = []
        self.n: list[int] = []
        self.rows = rows

    def tensor(self) -> torch.Tensor:
        """The rows as one float64 vector ``[calls x columns]``."""
        return self.rows.tensor()


@dataclass
class CallLog:
    """The per-call reductions of the call probes since the recorder last swapped logs.

    On the CPU they are host numbers already (reading them costs no sync); on
    accelerators they stay on the device.
    """

    calls: dict[str, CallRows] = field(default_factory=dict)
    hook_s: float = 0.0  # seconds spent in output-gradient hooks (backward)
    reduced: torch.Tensor | None = None  # set by all_reduce: tensors(), summed over ranks

    def rows_for(self, probe: CallProbe, x: torch.Tensor) -> CallRows:
        """``probe``'s rows, made at its first call (on the host or on ``x``'s device)."""
        rows = self.calls.get(probe.name)
        if rows is None:
            kind = HostRows(len(probe.columns)) if x.is_cpu else probe.device_rows(x.device)
            rows = self.calls[probe.name] = CallRows(kind)
        elif x.is_cpu != isinstance(rows.rows, HostRows):
            raise GradflowError(
                f"layer outputs on several devices are not supported ({probe.name} probe)"
            )
        return rows

    def extend(
        self, probe: CallProbe, values: np.ndarray, layer_ids: list[int], sizes: list[int]
    ) -> None:
        """Append calls of CPU tensors measured elsewhere (``values``: float64 ``[calls x
        columns]``) to ``probe``'s rows."""
        if not layer_ids:
            return
        calls = self.rows_for(probe, _HOST)
        assert isinstance(calls.rows, HostRows)
        calls.rows.extend(values)
        calls.ids += layer_ids
        calls.n += sizes

    def blocks(self, order: Sequence[str]) -> dict[str, Block]:
        """Each logged probe's block, in ``order`` (that of :meth:`tensors`)."""
        out = {}
        for name in order:
            rows = self.calls.get(name)
            if rows is not None:
                out[name] = Block(len(rows.ids) * rows.rows.width, tuple(rows.ids), tuple(rows.n))
        return out

    def tensors(self, order: Sequence[str]) -> list[torch.Tensor]:
        """The logged probes' reductions as float64 vectors, in ``order`` (after
        :meth:`all_reduce` or :meth:`merged`: one vector for all, in the order given there)."""
        if self.reduced is not None:
            return [self.reduced]
        return [self.calls[name].tensor() for name in order if name in self.calls]

    def all_reduce(self, world_size: int, order: Sequence[str], group: Any = None) -> CallLog:
        """The same calls with reductions summed over all ranks (identical calls on every
        rank, which may have logged them in another order: each probe's calls are put in
        the order of their layers, a layer's calls in the order they came)."""
        import torch.distributed as dist

        out = CallLog(hook_s=self.hook_s)
        parts = []
        for name in order:
            rows = self.calls.get(name)
            if rows is not None:
                summed = out.calls[name] = CallRows(rows.rows)
                by_layer = sorted(range(len(rows.ids)), key=rows.ids.__getitem__)
                summed.ids = [rows.ids[i] for i in by_layer]
                summed.n = [rows.n[i] * world_size for i in by_layer]
                flat = rows.tensor()
                index = torch.tensor(by_layer, device=flat.device)
                parts.append(flat.view(len(by_layer), -1)[index].reshape(-1))
        if parts:  # one collective for everything, in float64 (exact for counts)
            out.reduced = torch.cat(parts)
            dist.all_reduce(out.reduced, group=group)
        return out

    @staticmethod
    def merged(logs: Sequence[CallLog], order: Sequence[str]) -> CallLog:
        """The calls of several logs (in order) as one log."""
        used = [log for log in logs if log.calls]
        hook_s = sum(log.hook_s for log in logs)
        if len(used) <= 1:
            out = used[0] if used else CallLog()
            out.hook_s = hook_s
            return out
        out = CallLog(hook_s=hook_s)
        parts = []
        for name in order:
            mine = [log.calls[name] for log in used if name in log.calls]
            if mine:
                merged = out.calls[name] = CallRows(mine[0].rows)
                merged.ids = [i for rows in mine for i in rows.ids]
                merged.n = [n for rows in mine for n in rows.n]
                parts += [rows.tensor() for rows in mine]
        out.reduced = torch.cat([t.to(parts[0].device) for t in parts])
        return out


class CallProbe(Probe):
    """A probe measured at layer calls: :attr:`columns` of a tensor per call, summed per
    layer on the host. With the kernels' columns (:data:`CALL_COLUMNS`, or ``sum_sq``
    alone) :meth:`reduce` fills them by the CPU kernels on the host or by device kernels
    elsewhere; a probe with columns of its own computes them and hands them to
    :meth:`append`."""

    scope = "call"

    def __init__(self) -> None:
        self.host = HostReducer(squares_only=self.columns == ("sum_sq",))
        self._kernel_columns = self.columns in (CALL_COLUMNS, ("sum_sq",))

    def device_rows(self, device: torch.device) -> DeviceRows:
        """Rows of :attr:`columns` on an accelerator."""
        return device_kernels.call_rows(device, self.columns)

    def reduce(self, x: torch.Tensor, log: CallLog, layer_id: int) -> None:
        """Append the kernels' reductions of ``x`` (one call of layer ``layer_id``) to ``log``."""
        if not self._kernel_columns:
            raise GradflowError(
                f"the {self.name} probe's columns {self.columns} are not the kernels': "
                "compute them and call append()"
            )
        calls = log.rows_for(self, x)
        rows = calls.rows
        if isinstance(rows, HostRows):
            self.host(x, rows)
        else:
            device_kernels.reduce_into(x, rows)
        calls.ids.append(layer_id)
        calls.n.append(x.numel())

    def append(self, log: CallLog, layer_id: int, x: torch.Tensor, values: torch.Tensor) -> None:
        """Append one call's :attr:`columns` (``values``: float64, one per column, on
        ``x``'s device) of tensor ``x`` to ``log``."""
        calls = log.rows_for(self, x)
        rows = calls.rows
        if isinstance(rows, HostRows):
            i = rows.claim()  # before reading rows.array: claiming may grow it
            rows.array[i] = values.detach().numpy()
        else:
            chunk, i = rows.next_row()
            chunk[i].copy_(values.detach())
        calls.ids.append(layer_id)
        calls.n.append(x.numel())

    @classmethod
    def unpack(
        cls, packed: np.ndarray, blocks: Sequence[Block], layers: LayerMap
    ) -> dict[str, np.ndarray]:
        """Sum per-call rows into per-layer reductions: a layer called several times in a
        step sums its calls; a layer not called is NaN."""
        ids = np.asarray(blocks[0].key, np.int64)
        k = len(cls.columns)
        calls = packed.reshape(len(packed), len(ids), k)
        counts = np.array([b.counts for b in blocks], np.float64).reshape(len(packed), -1)
        return _per_layer(layers.reg_to_layer[ids], layers.n_layers, counts, calls, cls.columns)


def _per_layer(
    layer_of_call: np.ndarray,
    n_layers: int,
    n_per_call: np.ndarray,
    calls: np.ndarray,
    names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Sum per-call reductions [R, C, k] into per-layer ones [R, L] (NaN for layers
    without calls)."""
    n_rows = len(calls)
    out = {name: np.full((n_rows, n_layers), np.nan) for name in (*names, "n")}
    if len(layer_of_call) == 0:
        return out
    order = np.argsort(layer_of_call, kind="stable")
    layers = layer_of_call[order]
    starts = np.flatnonzero(np.r_[True, layers[1:] != layers[:-1]])
    called = layers[starts]
    for j, name in enumerate(names):
        out[name][:, called] = np.add.reduceat(calls[:, order, j], starts, axis=1)
    out["n"][:, called] = np.add.reduceat(n_per_call[:, order], starts, axis=1)
    return out
