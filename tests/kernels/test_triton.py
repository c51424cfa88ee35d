"""The fused Triton kernel's selection: opt-in (``GRADFLOW_TRITON=1``), used only where its
first-use check agrees with torch, never on the CPU; and the backend names a run file
stores (:func:`gradflow.kernels.kernel_backend`). The kernel's numbers, in Triton's CPU
interpreter and on CUDA: tests/kernels/test_contract.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gradflow import kernels
from gradflow.kernels import triton as fused
from gradflow.kernels.cpu import cpu_backend


def test_fused_kernel_is_used_only_where_it_agrees_with_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first-use check that decides between the fused kernel and torch operations, fed
    # with stand-in kernels: one exact, one off by a little in the sum, one that counts
    # NaN but not Inf. Never on the CPU, nor with GRADFLOW_TRITON=0.
    def sums(x: torch.Tensor, nan_only: bool = False) -> torch.Tensor:
        a = x.double()
        bad = a.isnan() if nan_only else ~a.isfinite()
        return torch.stack([a.sum(), (a * a).sum(), (a != 0).sum(), bad.sum()]).double()

    def kernel_like(compute: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
        def run(x: torch.Tensor, rows: torch.Tensor, index: int) -> None:
            rows[index] += compute(x)

        return run

    cpu = torch.device("cpu")
    off = torch.tensor([1.001, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert fused._agrees(kernel_like(sums), cpu)
    assert not fused._agrees(kernel_like(lambda x: sums(x) * off), cpu)
    assert not fused._agrees(kernel_like(lambda x: sums(x, nan_only=True)), cpu)
    assert fused.reducer(cpu) is None
    monkeypatch.setenv("GRADFLOW_TRITON", "0")
    fused.reducer.cache_clear()
    assert fused.reducer(torch.device("cuda", 0)) is None
    fused.reducer.cache_clear()


def test_backend_names_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.kernel_backend(torch.device("cpu")) == cpu_backend()
    assert cpu_backend() in ("c-extension", "c-cached", "c-private", "torch")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fused, "reducer", lambda device: None)
    assert kernels.kernel_backend(cuda) == "cuda-graphs"
    monkeypatch.setattr(fused, "reducer", lambda device: print)
    assert kernels.kernel_backend(cuda) == "triton"
    assert kernels.kernel_backend(torch.device("meta")) == "torch"


def test_triton_kernel_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    # Off unless GRADFLOW_TRITON=1: Triton is not even looked up.
    def no_lookup() -> None:
        raise AssertionError("Triton looked up while the fused kernel is off")

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fused, "_kernel", no_lookup)
    for value in (None, "0", "yes"):
        if value is None:
            monkeypatch.delenv("GRADFLOW_TRITON", raising=False)
        else:
            monkeypatch.setenv("GRADFLOW_TRITON", value)
        fused.reducer.cache_clear()
        assert fused.reducer(cuda) is None
    monkeypatch.setenv("GRADFLOW_TRITON", "1")
    monkeypatch.setattr(fused, "_kernel", lambda: None)  # as without Triton
    fused.reducer.cache_clear()
    assert fused.reducer(cuda) is None
    fused.reducer.cache_clear()
