"""Every reduction backend against the float64 oracle, :mod:`gradflow.kernels.reference`.

The contract: layer outputs give :data:`~gradflow.kernels.CALL_COLUMNS` (output gradients
``sum_sq`` alone) as :meth:`gradflow.probes.CallLog.tensors` reports them; parameters give
``w_sq, g_sq, g_nonfinite`` and :data:`~gradflow.kernels.DELTA_COLUMNS` per tensor.
Backends: the C kernels from the install-time extension (``c-extension``), from the per-user
cache (``c-cached``) and built without run-time dispatch (``c-portable``, the code of
compilers without ifunc); torch operations on the host (``torch``); the accelerator path's
torch operations run on the CPU (``device``); the Triton kernel in its CPU interpreter
(``triton``); on a CUDA machine the CUDA paths too (``cuda``: torch operations,
``cuda-triton``: the fused kernel, ``cuda-graphs``: parameter reductions replayed as CUDA
graphs).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradflow.kernels import CALL_COLUMNS, DELTA_COLUMNS, reference
from gradflow.kernels import cpu as native
from gradflow.kernels import triton as fused
from gradflow.kernels.cpu import KERNEL_DTYPES, ParamKernels, _holding_gil
from gradflow.kernels.device import DeviceRows, reduce_into
from gradflow.probes import ActivationProbe, CallLog, GradOutputProbe, Snapshot
from gradflow.probes.grad_output import grad_output_hook

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
C_BACKENDS = ["c-extension", "c-cached", "c-portable"]
# The build without run-time dispatch compiles in a fifth of the time.
PORTABLE = ["-DGRADFLOW_PORTABLE"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=generator(seed))


def with_values(x: torch.Tensor, spots: dict[int, float]) -> torch.Tensor:
    for i, v in spots.items():
        x[i] = v
    return x


INF, NAN = float("inf"), float("nan")
# Odd sizes around the kernels' blocks (C: 4096 entries, Triton: 2048), zeros, signed
# zeros, non-finite entries in a later block than the first, large offsets, half precision
# and strided views (the last reach the C backends' torch branch).
INPUTS: dict[str, Callable[[], torch.Tensor]] = {
    "empty": lambda: torch.empty(0),
    "one-zero": lambda: torch.zeros(1),
    "signed-zeros": lambda: torch.tensor([-0.0, 0.0, 2.5, -0.0, 0.0, 0.0, -1.0]),
    "odd-4099": lambda: randn(4099, 1),
    "relu-300001": lambda: randn(300_001, 2).relu(),
    "relu-4M": lambda: torch.randn(2, 8, 512, 512, generator=generator(5)).relu(),
    "offset-65537": lambda: randn(65_537, 3) * 30 + 500,
    "rows-over-2**16": lambda: torch.randn(3, 70_000, generator=generator(5)) + 3.0,
    # Means 1e2 to 1e5 times the std: the std from the columns cancels in float64 only
    "mean-1e2-std": lambda: randn(5000, 20) + 100,
    "mean-1e4-std": lambda: randn(70_001, 21) * 0.01 + 100,
    "mean-1e5-std": lambda: randn(9001, 22) + 1e5,
    "mean-minus-1e5-std": lambda: randn(300_001, 23) * 1e-3 - 100,
    "outlier-first": lambda: with_values(randn(9000, 24) + 1e4, {0: 1e6}),
    "outlier-later": lambda: with_values(randn(9000, 27) - 1e4, {4100: 3e6, 8000: -1e5}),
    "nan-first-offset": lambda: with_values(randn(5000, 25) + 1e4, {0: NAN}),
    "inf-first-offset": lambda: with_values(randn(5000, 26) - 1e4, {0: INF}),
    "nan": lambda: with_values(randn(9001, 4), {4500: NAN, 0: 0.0}),
    "inf": lambda: with_values(randn(5000, 5), {4097: INF, 3: INF, 7: 0.0}),
    "both-infs": lambda: with_values(randn(4097, 6), {4096: -INF, 1: INF}),
    "nan-and-inf": lambda: with_values(randn(33, 7), {32: NAN, 0: -INF}),
    "nan-and-both-infs": lambda: torch.tensor([1.0, NAN, 0.0, INF, -INF]),
    "fp16": lambda: (randn(999, 8) * 300).half(),
    # A sum of squares beyond float16's largest value (65504)
    "fp16-3d": lambda: (torch.randn(4, 64, 32, generator=generator(5)) * 30).half(),
    # bfloat16 (CPU autocast): over several of the kernel's 8192-entry runs, far from zero,
    # non-finite entries beyond the first run
    "bf16": lambda: (randn(20_001, 30) * 50).bfloat16(),
    "bf16-mean-1e3-std": lambda: (randn(17_000, 31) + 1000).bfloat16(),
    "bf16-nan-inf": lambda: with_values(randn(9001, 32), {8193: NAN, 2: -INF}).bfloat16(),
    # channels-last (CPU convolutions): dense, not contiguous
    "channels-last": lambda: (torch.randn(3, 16, 20, 20, generator=generator(6)) + 2).contiguous(
        memory_format=torch.channels_last
    ),
    "channels-last-bf16": lambda: (
        torch.randn(2, 8, 4, 4, 4, generator=generator(7))
        .bfloat16()
        .contiguous(memory_format=torch.channels_last_3d)
    ),
    "strided": lambda: randn(33 * 65, 9).view(33, 65).t(),
    "transposed-3d": lambda: torch.randn(16, 12, 10, generator=generator(5)).transpose(0, 2),
}


BIG = {"relu-4M"}


def call_reference(x: torch.Tensor) -> np.ndarray:
    """The oracle's :data:`~gradflow.kernels.CALL_COLUMNS` of ``x``, in that order."""
    columns = reference.call_columns(x)
    return np.array([columns[name] for name in CALL_COLUMNS])


def assert_matches(got: float, want: float, what: str, rtol: float, atol: float = 0.0) -> None:
    """Finite values to float32-accumulation accuracy, NaN and +-Inf exactly."""
    if np.isfinite(want):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def assert_columns(row: np.ndarray, x: torch.Tensor, what: str) -> None:
    want = call_reference(x)
    np.testing.assert_array_equal(row[2:], want[2:], err_msg=f"{what}: counts")
    # A sum may cancel to ~0: its error is bounded by the float32 rounding of sum |x|.
    abs_sum = float(x.detach().double().abs().nan_to_num(posinf=0.0).sum())
    assert_matches(row[0], want[0], f"{what}: sum", 1e-6, 1e-6 * abs_sum)
    assert_matches(row[1], want[1], f"{what}: sum_sq", 1e-6)
    a = x.detach().double().numpy().reshape(-1)
    if a.size and np.isfinite(want[:2]).all():
        # The std as gradflow.statistics computes it; float64 columns themselves round
        # var by ~1e-16 (mean/std)^2 (2e-6 of the std at a mean 1e5 times the std).
        mean, std = row[0] / a.size, a.std()
        got = np.sqrt(max(row[1] / a.size - mean * mean, 0.0))
        rtol = 1e-6 + 5e-16 * (a.mean() / std) ** 2 if std else 0.0
        np.testing.assert_allclose(got, std, rtol=rtol, atol=0.0, err_msg=f"{what}: std")


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ctypes.CDLL | str]:
    """The C kernels of each C backend, or why that one is unavailable here."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    built = native.extension_path()
    found: dict[str, ctypes.CDLL | str] = {"c-extension": "no install-time build"}
    if built is not None:
        found["c-extension"] = native.load(built) or f"{built} fails its check"
    for name, flags in (("c-cached", []), ("c-portable", PORTABLE)):
        path, why = native.build_cached(cache, flags)
        found[name] = why if path is None else native.load(path) or f"{path} fails its check"
    return found


def library(backend: str, libraries: dict[str, ctypes.CDLL | str]) -> ctypes.CDLL:
    """The backend's kernels; skips where it cannot exist here, fails where it is broken."""
    found = libraries[backend]
    if isinstance(found, str):
        if found == "no install-time build" or found.startswith("no C compiler"):
            pytest.skip(f"{backend}: {found}")
        pytest.fail(f"{backend}: {found}")
    return found


def use_kernels(monkeypatch: pytest.MonkeyPatch, lib: ctypes.CDLL | None) -> None:
    """Make the probes use ``lib`` (``None``: torch operations)."""

    def kernel(
        squares_only: bool = False, hold_gil: bool = False, dtype: torch.dtype = torch.float32
    ) -> Callable[..., None] | None:
        if lib is None:
            return None
        held = _holding_gil(lib) if hold_gil else lib
        kind = "squares" if squares_only else "reduce"
        return getattr(held, f"gradflow_{kind}_{KERNEL_DTYPES[dtype]}")  # type: ignore[no-any-return]

    monkeypatch.setattr("gradflow.kernels.cpu.kernel", kernel)
    monkeypatch.setattr(
        "gradflow.probes.snapshot.param_kernels",
        lambda sizes: None if lib is None else ParamKernels(lib, sizes),
    )


@pytest.fixture
def fused_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fused kernel chosen for CUDA layer outputs (``GRADFLOW_TRITON=1``); skips
    without Triton, fails where it disagrees with torch at first use."""
    monkeypatch.setenv("GRADFLOW_TRITON", "1")
    fused.reducer.cache_clear()
    try:
        if fused._kernel() is None:
            pytest.skip("Triton is not installed: the fused kernel is unchecked")
        cuda = torch.device("cuda", torch.cuda.current_device())  # that of x.to("cuda")
        assert fused.reducer(cuda) is not None, "the first-use check failed"
        yield
    finally:
        fused.reducer.cache_clear()


def triton_rows(xs: list[torch.Tensor], tmp_path: Path) -> np.ndarray:
    """The Triton kernel's rows for ``xs``, by its CPU interpreter (a process of its own: the
    interpreter is chosen before Triton is imported). Tensors beyond 5 blocks take several
    launches, each of up to 3 programs."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install triton): its kernel is unchecked")
    torch.save(xs, tmp_path / "inputs.pt")
    args = [str(tmp_path / "inputs.pt"), str(tmp_path / "rows.pt"), str(5 * fused.BLOCK + 3)]
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "fused_interpreted.py"), *args],
        env={**os.environ, "TRITON_INTERPRET": "1", "GRADFLOW_TRITON": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "rows.pt").numpy()


def probe_rows(xs: list[torch.Tensor], device: str) -> tuple[np.ndarray, np.ndarray]:
    """Layer-output and output-gradient rows as the probes log them, of ``xs`` moved to
    ``device``."""
    log = CallLog()
    probe, gprobe = ActivationProbe(), GradOutputProbe()
    for i, x in enumerate(xs):
        x = x.to(device)
        probe.reduce(x, log, i)
        grad_output_hook(gprobe, lambda: log, i)(x)
    act, gout = log.tensors(["activation", "grad_output"])
    return act.cpu().numpy(), gout.cpu().numpy()


def device_rows(xs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The accelerator path's rows (float64 reductions written in place, no host branch)
    of CPU tensors."""
    cpu = torch.device("cpu")
    act, gout = DeviceRows(cpu, len(CALL_COLUMNS)), DeviceRows(cpu, 1)
    for x in xs:
        reduce_into(x, act)
        reduce_into(x, gout)
    return act.tensor().numpy(), gout.tensor().numpy()


@pytest.mark.parametrize(
    "backend",
    [
        *C_BACKENDS,
        "torch",
        "device",
        "triton",
        pytest.param("cuda", marks=needs_cuda),
        pytest.param("cuda-triton", marks=needs_cuda),
    ],
)
def test_call_columns_match_the_reference(
    backend: str, libraries, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request
) -> None:
    # Then 260 small calls: the rows outgrow their first allocation (host: 64 rows,
    # accelerators: chunks of 256). Neither those nor the 4M-entry output for Triton in its
    # interpreter, whose rows are the same as "device"'s and whose launches take ~10 ms each
    # (the 4M entries take 410 launches: 35 s instead of 10 s for this case on 2 cores).
    interpreted = backend == "triton"
    cases = {name: make() for name, make in INPUTS.items() if not (interpreted and name in BIG)}
    extra = 0 if interpreted else 260
    cases.update({f"call {i}": randn(1 + 13 * i, 100 + i).relu() for i in range(extra)})
    xs = list(cases.values())
    gout = None
    if backend == "triton":
        act = triton_rows(xs, tmp_path)
    elif backend == "device":
        act, gout = device_rows(xs)
    elif backend.startswith("cuda"):
        if backend == "cuda":
            monkeypatch.setattr("gradflow.kernels.device.reducer", lambda device: None)
        else:
            request.getfixturevalue("fused_on")
        act, gout = probe_rows(xs, "cuda")
    else:
        use_kernels(monkeypatch, None if backend == "torch" else library(backend, libraries))
        act, gout = probe_rows(xs, "cpu")
    act = act.reshape(len(xs), len(CALL_COLUMNS))
    for i, (name, x) in enumerate(cases.items()):
        assert_columns(act[i], x, f"{backend} {name}")
        if gout is not None:  # output gradients: the sum of squares alone, unshifted
            # An outlier 1e4 times the rest rounds their squares in its float run: ~1e-5.
            rtol = 2e-5 if name.startswith("outlier") else 1e-6
            want = reference.call_columns(x)["sum_sq"]
            assert_matches(gout[i], want, f"{backend} {name}: gradient sum_sq", rtol)


def _odd_params(device: torch.device) -> tuple[list[nn.Parameter], list[torch.Tensor | None]]:
    """Parameters of odd sizes (one empty, one over a million entries) and their gradients:
    one missing, some with NaN or +-Inf."""
    gen = generator(11)
    shapes = [(0,), (1,), (7,), (4099,), (1_100_003,), (64, 3, 3, 3), (5,)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device) + 0.25) for s in shapes]
    params[1].data.fill_(-0.0)  # updated to +0.0: d = -0.0, whose bits would be the largest
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=gen) for s in shapes]
    grads[1] = None
    grads[2][3], grads[2][6] = NAN, INF  # type: ignore[index]
    grads[3][4098] = -INF  # type: ignore[index]
    return params, [None if g is None else g.to(device) for g in grads]


def _odd_update(params: list[nn.Parameter]) -> None:
    """An update with an infinite entry, a NaN, -0 against +0 and ordinary changes."""
    with torch.no_grad():
        for p in params:
            p.mul_(0.9).add_(0.01)
        params[1].fill_(0.0)
        params[2][5] = INF
        params[6][0] = NAN


def _large_params(device: torch.device) -> tuple[list[nn.Parameter], list[torch.Tensor | None]]:
    """Tensors of millions of entries (where a single float32 pass drifts by ~1e-3), sizes
    that are not multiples of the row length, and an empty tensor."""
    gen = generator(3)
    shapes = [(3_000_001,), (0,), (257,), (1_500_000,), (64, 3, 3, 3), (1,), (700_000,)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device) + 0.5) for s in shapes]
    return params, [torch.randn(s, generator=gen).to(device) for s in shapes]


def _large_update(params: list[nn.Parameter]) -> None:
    """An ordinary update of every entry."""
    with torch.no_grad():
        for p in params:
            p.mul_(0.9).add_(0.01)


def _wide_params(device: torch.device) -> tuple[list[nn.Parameter], list[torch.Tensor | None]]:
    """float64 parameters and gradients (the snapshot is float64 then), one gradient
    missing."""
    params, grads = _large_params(device)
    wide: list[torch.Tensor | None] = [None if g is None else g.double() for g in grads]
    wide[2] = None
    return [nn.Parameter(p.detach().double()) for p in params], wide


PARAMS = {
    "odd": (_odd_params, _odd_update),
    "large": (_large_params, _large_update),
    "float64": (_wide_params, _large_update),
}


@pytest.mark.parametrize("params_case", list(PARAMS))
@pytest.mark.parametrize(
    ("backend", "threads"),
    [
        *[(name, threads) for name in C_BACKENDS for threads in (1, 3)],
        ("torch", 1),
        pytest.param("cuda-graphs", 1, marks=needs_cuda),
    ],
)
def test_parameter_columns_match_the_reference(
    backend: str, threads: int, params_case: str, libraries, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With three torch threads the C kernels split the tensors over three threads; the
    # torch backend is the path of other devices and dtypes.
    use_kernels(monkeypatch, library(backend, libraries) if backend in C_BACKENDS else None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    device = torch.device("cuda" if backend == "cuda-graphs" else "cpu")
    make, update = PARAMS[params_case]
    params, grads = make(device)
    snap = Snapshot(params, device, graphs=backend == "cuda-graphs")
    before = [p.detach().clone() for p in params]
    g_sq, g_bad = (t.cpu().numpy() for t in snap.grad_reductions(grads))
    w_sq = snap.take().cpu().numpy()
    update(params)
    deltas = dict(zip(DELTA_COLUMNS, (t.cpu().numpy() for t in snap.delta(grads)), strict=True))

    grad_want = reference.grad_columns(grads)
    want = {
        "w_sq": reference.weight_columns(before)["sum_sq"],
        "g_sq": grad_want["sum_sq"],
        "g_nonfinite": grad_want["nonfinite"],
        **reference.delta_columns(before, params, grads),
    }
    got = {"w_sq": w_sq, "g_sq": g_sq, "g_nonfinite": g_bad, **deltas}
    # g.d sums products of either sign: its error is bounded by the rounding of sum |g d|.
    abs_dot = [
        0.0 if g is None else float((g.double() * (b - p.detach()).double()).abs().nansum())
        for g, b, p in zip(grads, before, params, strict=True)
    ]
    for name, values in got.items():
        assert values.shape == (len(params),), name
        # The snapshot is float32: d carries float32 rounding of W (1e-5 relative).
        rtol = 1e-5 if name.startswith(("d_", "g_dot")) else 1e-6
        expected = want[name].tolist()
        for i, (value, wanted) in enumerate(zip(values.tolist(), expected, strict=True)):
            atol = 1e-6 * abs_dot[i] if name == "g_dot_d" else 0.0
            assert_matches(value, wanted, f"{backend} {name}[{i}]", rtol, atol)
    d_sq, d_abs, g_dot_d, d_max = (deltas[name] for name in DELTA_COLUMNS)
    if params_case == "odd":
        assert np.isnan(d_max[6]) and d_max[2] == INF and d_max[1] == 0.0
        assert np.isnan(g_dot_d[[2, 6]]).all() and np.isinf(g_dot_d[3]) and g_dot_d[1] == 0.0
    else:  # the empty tensor
        assert d_sq[1] == d_abs[1] == g_dot_d[1] == d_max[1] == 0.0
    if params_case == "float64":  # the missing gradient
        assert g_dot_d[2] == 0.0 and d_sq[2] > 0


@pytest.mark.parametrize("backend", [*C_BACKENDS, "torch"])
def test_an_update_without_gradients_has_nan_products(
    backend: str, libraries, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An epoch's update: the same columns, g_dot_d NaN (no one gradient belongs to it).
    use_kernels(monkeypatch, library(backend, libraries) if backend in C_BACKENDS else None)
    params, _ = _odd_params(torch.device("cpu"))
    snap = Snapshot(params, torch.device("cpu"))
    before = [p.detach().clone() for p in params]
    snap.take()
    _large_update(params)
    got = dict(zip(DELTA_COLUMNS, (t.numpy() for t in snap.delta()), strict=True))
    want = reference.delta_columns(before, params)
    for name in DELTA_COLUMNS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, equal_nan=True, err_msg=name)
    assert np.isnan(got["g_dot_d"]).all()
