"""The oracle: every reduction of :mod:`gradflow.kernels` in plain float64 torch, on any
device. Slow and obvious on purpose; the contract test (tests/kernels/test_contract.py)
holds every other backend to it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gradflow.kernels import CALL_COLUMNS


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
    before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-tensor ``d_sq``, ``d_abs`` and ``d_max`` of ``d = before - after`` (float64 [P];
    the maximum of an empty tensor is 0, NaN where ``d`` has a NaN)."""
    out: dict[str, list[torch.Tensor]] = {"d_sq": [], "d_abs": [], "d_max": []}
    for b, a in zip(before, after, strict=True):
        d = (b.detach().double() - a.detach().double()).cpu().abs().reshape(-1)
        out["d_sq"].append((d * d).sum())
        out["d_abs"].append(d.sum())
        if d.isnan().any():
            out["d_max"].append(d.new_tensor(math.nan))
        else:
            out["d_max"].append(d.max() if d.numel() else d.new_tensor(0.0))
    return {name: torch.stack(values) for name, values in out.items()}
