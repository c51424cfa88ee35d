"""Reduction kernels: one module per backend, every one filling the same named columns.

The probes never compute a statistic on the device, only these reductions (float64):

- per layer call (:data:`CALL_COLUMNS`): ``sum``, ``sum_sq``, ``nonzero`` (entries that
  are not exactly 0; NaN and Inf count) and ``nonfinite`` of a layer output or output
  gradient; a probe may ask for a subset (output gradients: ``sum_sq`` only);
- per parameter tensor (:data:`GRAD_COLUMNS`, :data:`WEIGHT_COLUMNS`,
  :data:`DELTA_COLUMNS`): the gradient's ``sum_sq`` and ``nonfinite``, the weight's
  ``sum_sq`` (taken with its copy), and ``d_sq``, ``d_abs``, ``g_dot_d``, ``d_max`` of
  ``d = W_before - W_after`` (``g_dot_d``: the sum of ``grad * d``, with the gradient the
  optimizer stepped on; NaN where no gradient is given, as for an epoch's update). The
  maximum comes last: every other column is a sum.

Backends: :mod:`~gradflow.kernels.reference` (plain float64 torch on any device: the oracle
the contract test holds every other backend to), :mod:`~gradflow.kernels.cpu` (the C
kernels: built, loaded, and the parameter passes) with :mod:`~gradflow.kernels.host`
(per-call reductions on the host: the C kernels, torch where they are missing),
:mod:`~gradflow.kernels.device` (torch on accelerators; parameter reductions replayed as
CUDA graphs on CUDA) and
:mod:`~gradflow.kernels.triton` (one fused kernel per layer output on CUDA, opt-in).
:mod:`~gradflow.kernels.prehook` reduces output gradients on the CPU inside C++ autograd
pre-hooks, with the C kernels; :mod:`~gradflow.kernels.cached_build` compiles both native
libraries into the per-user cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CALL_COLUMNS = ("sum", "sum_sq", "nonzero", "nonfinite")
GRAD_COLUMNS = ("sum_sq", "nonfinite")
WEIGHT_COLUMNS = ("sum_sq",)
DELTA_COLUMNS = ("d_sq", "d_abs", "g_dot_d", "d_max")


def kernel_backend(device: torch.device) -> str:
    """The kernels that reduce tensors on ``device`` (stored in every run file):
    ``c-extension``, ``c-cached``, ``c-private`` or ``torch`` on the CPU
    (:func:`.cpu.cpu_backend`); on CUDA ``triton`` where the fused layer-output kernel
    is on, else ``cuda-graphs`` (parameter reductions replayed as CUDA graphs, the rest
    by torch operations); ``torch`` on other devices."""
    if device.type == "cpu":
        from gradflow.kernels.cpu import cpu_backend

        return cpu_backend()
    if device.type == "cuda":
        from gradflow.kernels.triton import reducer

        return "triton" if reducer(device) is not None else "cuda-graphs"
    return "torch"
