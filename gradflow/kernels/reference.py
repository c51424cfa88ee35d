"""The oracle: every reduction of :mod:`gradflow.kernels` in plain float64 torch, on any
device. Slow and obvious on purpose; the contract test (tests/kernels/test_contract.py)
holds every other backend to it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradflow.kernels import CALL_COLUMNS, DELTA_COLUMNS


def call_columns(x: torch.Tensor) -> dict[str, float]:
    """:data:`~gradflow.kernels.CALL_COLUMNS` of one layer output (or output gradient)."""
    a = x.detach().to(torch.float64).reshape(-1)
    values = [a.sum(), (a * a).sum(), (a != 0).sum(), (~torch.isfinite(a)).sum()]
    return dict(zip(CALL_COLUMNS, (float(v) for v in values), strict=True))


def grad_columns(grads: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Per-tensor ``sum_sq`` and ``nonfinite`` (float64 [P]; a missing gradient counts 0)."""
    sq, bad = [], []
    for g in grads:
        a = torch.zeros(1, dtype=torch.float64) if g is None else g.detach().double().cpu()
        sq.append((a * a).sum())
        bad.append((~torch.isfinite(a)).sum().double())
    return {"sum_sq": torch.stack(sq), "nonfinite": torch.stack(bad)}


def weight_columns(weights: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-tensor ``sum_sq`` of the weights (float64 [P])."""
    return {"sum_sq": torch.stack([w.detach().double().cpu().square().sum() for w in weights])}


def delta_columns(
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-tensor :data:`~gradflow.kernels.DELTA_COLUMNS` of ``d = before - after`` (float64
    [P]): ``d_sq``, ``d_abs``, ``g_dot_d`` (the sum of ``grad * d``: 0 for a missing
    gradient, NaN without ``grads``) and ``d_max`` (0 for an empty tensor, NaN where ``d``
    has a NaN)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in DELTA_COLUMNS}
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        signed = (b.detach().double() - a.detach().double()).cpu().reshape(-1)
        d = signed.abs()
        out["d_sq"].append((d * d).sum())
        out["d_abs"].append(d.sum())
        grad = None if grads is None else grads[i]
        if grads is None:
            out["g_dot_d"].append(d.new_tensor(math.nan))
        elif grad is None:
            out["g_dot_d"].append(d.new_tensor(0.0))
        else:
            out["g_dot_d"].append((grad.detach().double().cpu().reshape(-1) * signed).sum())
        if d.isnan().any():
            out["d_max"].append(d.new_tensor(math.nan))
        else:
            out["d_max"].append(d.max() if d.numel() else d.new_tensor(0.0))
    return {name: torch.stack(values) for name, values in out.items()}
