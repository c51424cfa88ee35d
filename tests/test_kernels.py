"""Every reduction backend against one float64 reference, and how the C kernels are delivered.

The contract: layer outputs give the columns ``[sum, sum_sq, nonzero, nonfinite]`` (and
output gradients ``sum_sq``) as :meth:`gradflow.probes.CallLog.tensors` reports them;
parameters give ``w_sq, g_sq, g_nonfinite, d_sq, d_abs, d_max`` per tensor. Backends: the C
kernels from the install-time extension (``c-extension``), from the per-user cache
(``c-cached``) and built without run-time dispatch (``c-portable``, the code of compilers
without ifunc); torch operations on the host (``torch``); the accelerator path's torch
operations run on the CPU (``device``); the Triton kernel in its CPU interpreter
(``triton``); on a CUDA machine the CUDA paths too.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import fused, native
from gradflow.cli.main import main
from gradflow.errors import GradflowWarning
from gradflow.native import ParamKernels
from gradflow.probes import ActivationProbe, CallLog, HostReducer, Snapshot, grad_output_hook
from gradflow.recorder import Recorder
from gradflow.store import open_run

REPO = Path(__file__).resolve().parents[1]
C_BACKENDS = ["c-extension", "c-cached", "c-portable"]
# The build without run-time dispatch compiles in a fifth of the time: the cache tests use it.
PORTABLE = ["-DGRADFLOW_PORTABLE"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


def randn(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def with_values(x: torch.Tensor, spots: dict[int, float]) -> torch.Tensor:
    for i, v in spots.items():
        x[i] = v
    return x


INF, NAN = float("inf"), float("nan")
# Odd sizes around the kernels' blocks (C: 4096 entries, Triton: 2048), zeros, signed
# zeros, non-finite entries in a later block than the first, large offsets, half precision
# and a strided view (the last two reach the C backends' torch branch).
INPUTS: dict[str, Callable[[], torch.Tensor]] = {
    "empty": lambda: torch.empty(0),
    "one-zero": lambda: torch.zeros(1),
    "signed-zeros": lambda: torch.tensor([-0.0, 0.0, 2.5, -0.0, 0.0, 0.0, -1.0]),
    "odd-4099": lambda: randn(4099, 1),
    "relu-300001": lambda: randn(300_001, 2).relu(),
    "offset-65537": lambda: randn(65_537, 3) * 30 + 500,
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
    "fp16": lambda: (randn(999, 8) * 300).half(),
    "strided": lambda: randn(33 * 65, 9).view(33, 65).t(),
}


def reference(x: torch.Tensor) -> np.ndarray:
    """``[sum, sum_sq, nonzero, nonfinite]`` in float64 by plain torch operations."""
    a = x.detach().double().reshape(-1)
    return torch.stack([a.sum(), (a * a).sum(), (a != 0).sum(), (~a.isfinite()).sum()]).numpy()


def assert_matches(got: float, want: float, what: str, rtol: float, atol: float = 0.0) -> None:
    """Finite values to float32-accumulation accuracy, NaN and +-Inf exactly."""
    if np.isfinite(want):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


def assert_columns(row: np.ndarray, x: torch.Tensor, what: str) -> None:
    want = reference(x)
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

    def kernel(squares_only: bool = False) -> Callable[..., None] | None:
        if lib is None:
            return None
        return lib.gradflow_squares_f32 if squares_only else lib.gradflow_reduce_f32

    monkeypatch.setattr("gradflow.probes.kernel", kernel)
    monkeypatch.setattr(
        "gradflow.probes.param_kernels",
        lambda sizes: None if lib is None else ParamKernels(lib, sizes),
    )


def triton_rows(xs: list[torch.Tensor], tmp_path: Path) -> np.ndarray:
    """The Triton kernel's rows for ``xs``, by its CPU interpreter (a process of its own: the
    interpreter is chosen before Triton is imported). Tensors beyond 5 blocks take several
    launches, each of up to 3 programs."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install triton): its kernel is unchecked")
    torch.save(xs, tmp_path / "inputs.pt")
    script = Path(__file__).parent / "scripts" / "fused_interpreted.py"
    args = [str(tmp_path / "inputs.pt"), str(tmp_path / "rows.pt"), str(5 * fused.BLOCK + 3)]
    done = subprocess.run(
        [sys.executable, str(script), *args],
        env={**os.environ, "TRITON_INTERPRET": "1", "GRADFLOW_TRITON": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(tmp_path / "rows.pt").numpy()


@pytest.mark.parametrize(
    "backend",
    [*C_BACKENDS, "torch", "device", "triton", pytest.param("cuda", marks=needs_cuda)],
)
def test_activation_columns_match_the_float64_reference(
    backend: str, libraries, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Then 260 small calls: the rows outgrow their first allocation (host: 64 rows,
    # accelerators: chunks of 256). Not for Triton, whose rows are the same as "device"'s
    # and whose interpreter takes ~10 ms a launch.
    cases = {name: make() for name, make in INPUTS.items()}
    extra = 0 if backend == "triton" else 260
    cases.update({f"call {i}": randn(1 + 13 * i, 100 + i).relu() for i in range(extra)})
    xs = list(cases.values())
    gout = None
    if backend == "triton":
        act = triton_rows(xs, tmp_path)
    else:
        log = CallLog()
        if backend in ("device", "cuda"):
            for x in xs:
                ActivationProbe.device(x.to("cuda") if backend == "cuda" else x, log)
            act = log.tensors()[0].cpu().numpy()
        else:
            use_kernels(monkeypatch, None if backend == "torch" else library(backend, libraries))
            host = HostReducer()
            probe = ActivationProbe(host)
            for i, x in enumerate(xs):
                probe(x, log, i)
                grad_output_hook(lambda: log, i, host)(x)
            act_t, gout_t = log.tensors()
            act, gout = act_t.numpy(), gout_t.numpy()
    act = act.reshape(len(xs), 4)
    for i, (name, x) in enumerate(cases.items()):
        assert_columns(act[i], x, f"{backend} {name}")
        if gout is not None:  # output gradients: the sum of squares alone, unshifted
            # An outlier 1e4 times the rest rounds their squares in its float run: ~1e-5.
            rtol = 2e-5 if name.startswith("outlier") else 1e-6
            assert_matches(gout[i], reference(x)[1], f"{backend} {name}: gradient sum_sq", rtol)


def _params(device: torch.device) -> tuple[list[nn.Parameter], list[torch.Tensor | None]]:
    """Parameters of odd sizes (one empty, one over a million entries) and their gradients:
    one missing, some with NaN or +-Inf."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(0,), (1,), (7,), (4099,), (1_100_003,), (64, 3, 3, 3), (5,)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device) + 0.25) for s in shapes]
    params[1].data.fill_(-0.0)  # updated to +0.0: d = -0.0, whose bits would be the largest
    grads: list[torch.Tensor | None] = [torch.randn(s, generator=gen) for s in shapes]
    grads[1] = None
    grads[2][3], grads[2][6] = NAN, INF  # type: ignore[index]
    grads[3][4098] = -INF  # type: ignore[index]
    return params, [None if g is None else g.to(device) for g in grads]


def _update(params: list[nn.Parameter]) -> None:
    """An update with an infinite entry, a NaN, -0 against +0 and ordinary changes."""
    with torch.no_grad():
        for p in params:
            p.mul_(0.9).add_(0.01)
        params[1].fill_(0.0)
        params[2][5] = INF
        params[6][0] = NAN


@pytest.mark.parametrize(
    ("backend", "threads"),
    [
        *[(name, threads) for name in C_BACKENDS for threads in (1, 3)],
        ("torch", 1),
        pytest.param("cuda-graphs", 1, marks=needs_cuda),
    ],
)
def test_parameter_columns_match_the_float64_reference(
    backend: str, threads: int, libraries, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With three torch threads the C kernels split the tensors over three threads.
    use_kernels(monkeypatch, library(backend, libraries) if backend in C_BACKENDS else None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    device = torch.device("cuda" if backend == "cuda-graphs" else "cpu")
    params, grads = _params(device)
    snap = Snapshot(params, device, graphs=backend == "cuda-graphs")
    before = [p.detach().double().cpu() for p in params]
    g_sq, g_bad = (t.cpu().numpy() for t in snap.grad_reductions(grads))
    w_sq = snap.take().cpu().numpy()
    _update(params)
    d_sq, d_abs, d_max = (t.cpu().numpy() for t in snap.delta())

    def g64(g: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64) if g is None else g.double().cpu()

    want: dict[str, list[float]] = {
        "w_sq": [float((w * w).sum()) for w in before],
        "g_sq": [float((g64(g) ** 2).sum()) for g in grads],
        "g_nonfinite": [float((~g64(g).isfinite()).sum()) for g in grads],
    }
    d64 = [(w - p.detach().double().cpu()).abs() for w, p in zip(before, params, strict=True)]
    want["d_sq"] = [float((d * d).sum()) for d in d64]
    want["d_abs"] = [float(d.sum()) for d in d64]
    want["d_max"] = [float(d.max()) if d.numel() else 0.0 for d in d64]
    got = {"w_sq": w_sq, "g_sq": g_sq, "g_nonfinite": g_bad, "d_sq": d_sq, "d_abs": d_abs}
    got["d_max"] = d_max
    for name, values in got.items():
        assert values.shape == (len(params),), name
        # The snapshot is float32: |d| carries float32 rounding of W (1e-5 relative).
        rtol = 1e-5 if name.startswith("d_") else 1e-6
        for i, (value, expected) in enumerate(zip(values.tolist(), want[name], strict=True)):
            assert_matches(value, expected, f"{backend} {name}[{i}]", rtol)
    assert np.isnan(d_max[6]) and d_max[2] == INF and d_max[1] == 0.0


# -- delivery: the per-user cache ---------------------------------------------------------


@pytest.fixture
def logging_cc(tmp_path: Path) -> tuple[Path, Path]:
    """A C compiler that logs its arguments, one line per run, then runs ``cc``."""
    log, wrapper = tmp_path / "cc.log", tmp_path / "logging-cc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec cc "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


def runs(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@needs_cc
def test_cached_build_is_made_once_and_reused_by_other_processes(
    tmp_path: Path, logging_cc: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrapper, log = logging_cc
    cache = tmp_path / "cache"
    monkeypatch.setenv("CC", str(wrapper))
    path, why = native.build_cached(cache)
    assert path is not None, why
    assert native.load(path) is not None
    # The compiler wrote a temporary file, renamed into place: never the final name.
    (line,) = runs(log)
    output = line.split(" -o ")[1]
    assert Path(output).parent == cache and Path(output).name.startswith(".build-")
    assert [p.name for p in cache.iterdir()] == [path.name]
    stamp = path.stat().st_mtime_ns
    assert native.build_cached(cache) == (path, "")
    code = (
        "from gradflow import native\n"
        "native.extension_path = lambda: None\n"  # as where pip built no extension
        "print(native.cpu_backend())\n"
    )
    env = {**os.environ, "GRADFLOW_CACHE_DIR": str(cache), "CC": str(wrapper)}
    env.pop("GRADFLOW_NATIVE", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["c-cached"]
    assert len(runs(log)) == 1 and path.stat().st_mtime_ns == stamp


@needs_cc
def test_concurrent_builds_leave_one_complete_library(
    tmp_path: Path, logging_cc: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several ranks starting at once with an empty cache: each gets a working library,
    # the cache ends with one file and no temporary leftovers.
    wrapper, log = logging_cc
    monkeypatch.setenv("CC", str(wrapper))
    cache = tmp_path / "cache"
    results: list[tuple[Path | None, str]] = []
    start = threading.Barrier(4)

    def rank() -> None:
        start.wait()
        results.append(native.build_cached(cache, PORTABLE))

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = {path for path, _ in results}
    assert len(results) == 4 and len(paths) == 1 and None not in paths
    (path,) = paths
    assert path is not None and native.load(path) is not None
    assert [p.name for p in cache.iterdir()] == [path.name]
    assert 1 <= len(runs(log)) <= 4


@needs_cc
def test_cache_key_follows_source_compiler_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = ["/usr/bin/cc", "-O3"]
    key = native.cache_key(b"int x;", command)
    assert key == native.cache_key(b"int x;", list(command))
    assert key != native.cache_key(b"int y;", command)
    assert key != native.cache_key(b"int x;", [*command, "-DGRADFLOW_PORTABLE"])
    assert key != native.cache_key(b"int x;", ["/opt/cc", "-O3"])
    cache = tmp_path / "cache"
    first, _ = native.build_cached(cache, PORTABLE)
    # An edited source (here: one comment more) is built anew, under another name.
    edited = tmp_path / "package"
    edited.mkdir()
    source = (native.HERE / native.SOURCE).read_text() + "/* edited */\n"
    (edited / native.SOURCE).write_text(source)
    monkeypatch.setattr(native, "HERE", edited)
    changed, _ = native.build_cached(cache, PORTABLE)
    assert first is not None and changed is not None and first != changed
    assert {p.name for p in cache.iterdir()} == {first.name, changed.name}


def test_failed_or_unsafe_builds_leave_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    # A compiler that writes half a library and fails: nothing at the final name, no
    # temporary file; a cache folder that other users may write to is not used.
    bad = tmp_path / "bad-cc"
    bad.write_text('#!/bin/sh\nfor a; do [ "$prev" = -o ] && echo partial > "$a"; prev=$a; done\n'
                   'echo "bad-cc: internal error" >&2\nexit 1\n')  # fmt: skip
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    cache = tmp_path / "cache"
    path, why = native.build_cached(cache)
    assert path is None and "internal error" in why
    assert list(cache.iterdir()) == []
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path, why = native.build_cached(shared)
    assert path is None and "other users" in why
    assert list(shared.iterdir()) == []
    # A CC that is not a command line; an installation without the C source.
    monkeypatch.setenv("CC", '"cc')
    assert native.build_cached(cache) == (None, 'no C compiler: "cc not found')
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setattr(native, "HERE", tmp_path)
    path, why = native.build_cached(cache)
    assert path is None and why.endswith("is missing (reinstall gradflow)")


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The process's choice of kernels made again, with an empty cache and no extension."""
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(native, "extension_path", lambda: None)
    monkeypatch.delenv("GRADFLOW_NATIVE", raising=False)
    native._library.cache_clear()
    yield
    native._library.cache_clear()


def test_without_a_compiler_torch_operations_run_after_one_warning(
    fresh_choice: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = [native.kernel(), native.kernel(squares_only=True), native.param_kernels([3])]
        backend = native.cpu_backend()
    assert kernels == [None, None, None] and backend == "torch"
    (warning,) = caught
    assert warning.category is GradflowWarning
    text = str(warning.message)
    assert "no C compiler" in text and "20x" in text and "GRADFLOW_NATIVE=0" in text
    # Asking for torch operations: no warning.
    native._library.cache_clear()
    monkeypatch.setenv("GRADFLOW_NATIVE", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.cpu_backend() == "torch" and native.kernel() is None
    assert caught == []


def test_a_broken_cached_library_is_named_in_the_warning(
    fresh_choice: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A "compiler" that succeeds but writes no library.
    fake = tmp_path / "fake-cc"
    fake.write_text('#!/bin/sh\nfor a; do [ "$prev" = -o ] && echo junk > "$a"; prev=$a; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.warns(GradflowWarning, match="does not load") as caught:
        assert native.cpu_backend() == "torch"
    (library,) = native.cache_dir().iterdir()
    assert str(library) in str(caught[0].message)


@needs_cc
def test_an_extension_built_from_another_source_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A package folder whose extension was built from the current source, then the source
    # edited (as in a checkout where _kernels.c changed since pip install -e).
    package = tmp_path / "package"
    package.mkdir()
    built, why = native.build_cached(tmp_path / "build", PORTABLE)
    assert built is not None, why
    shutil.copy(built, package / f"_kernels{importlib.machinery.EXTENSION_SUFFIXES[0]}")
    source = (native.HERE / native.SOURCE).read_text()
    monkeypatch.setattr(native, "HERE", package)
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADFLOW_NATIVE", raising=False)
    try:
        chosen = []
        for text in (source, source + "/* edited */\n"):
            (package / native.SOURCE).write_text(text)
            native._library.cache_clear()
            chosen.append(native.cpu_backend())
    finally:
        native._library.cache_clear()
    assert chosen == ["c-extension", "c-cached"]


# -- which backend ran ------------------------------------------------------------------------


def test_backend_names_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.kernel_backend(torch.device("cpu")) == native.cpu_backend()
    assert native.cpu_backend() in ("c-extension", "c-cached", "torch")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(fused, "reducer", lambda device: None)
    assert native.kernel_backend(cuda) == "cuda-graphs"
    monkeypatch.setattr(fused, "reducer", lambda device: print)
    assert native.kernel_backend(cuda) == "triton"
    assert native.kernel_backend(torch.device("meta")) == "torch"


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


@pytest.mark.parametrize("native_env", ["1", "0"], ids=["default", "GRADFLOW_NATIVE=0"])
def test_run_file_and_info_name_the_backend(
    native_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("GRADFLOW_NATIVE", native_env)
    native._library.cache_clear()
    try:
        expected = native.cpu_backend()
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 1, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = tmp_path / "run.h5"
        with Recorder(model, opt, path) as rec:
            opt.zero_grad()
            model(torch.randn(2, 1, 9, 9)).square().mean().backward()
            opt.step()
            rec.epoch_end()
    finally:
        native._library.cache_clear()
    if native_env == "0":
        assert expected == "torch"
    elif shutil.which("cc") is not None or native.extension_path() is not None:
        assert expected in ("c-extension", "c-cached")
    assert open_run(path).attrs["kernel_backend"] == expected
    try:
        status = main(["info", str(path)])
    except SystemExit as done:
        status = done.code
    out, err = capsys.readouterr()
    assert not status, err
    (line,) = [x for x in out.splitlines() if x.startswith("kernels")]
    assert line.split() == ["kernels", expected]


# -- delivery: the install-time extension -------------------------------------------------


@pytest.mark.slow
@needs_cc
def test_wheel_and_sdist_carry_the_kernels(tmp_path: Path) -> None:
    # Built from a copy of the project by setuptools' PEP 517 hooks (as pip does): the
    # wheel holds the compiled library and its source, the sdist the source and setup.py.
    if tuple(int(v) for v in importlib.metadata.version("setuptools").split(".")[:2]) < (70, 1):
        pytest.skip("needs setuptools >= 70.1 (the dev extra), which builds wheels itself")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, project / name)
    skip = shutil.ignore_patterns("*.so", "__pycache__")
    for name in ("gradflow", "cli"):
        shutil.copytree(REPO / name, project / name, ignore=skip)
    dist, plain = tmp_path / "dist", tmp_path / "no-compiler"

    def build(hook: str, into: Path, **env: str) -> None:
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        done = subprocess.run(
            [sys.executable, "-c", code, str(into)],
            cwd=project,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]

    for hook in ("build_wheel", "build_sdist"):  # one process each, as pip runs them
        build(hook, dist)
    # Without a compiler the extension is skipped, not the install: the wheel carries the
    # source for the cached build.
    shutil.rmtree(project / "build")
    build("build_wheel", plain, CC=str(tmp_path / "no-such-cc"))
    with zipfile.ZipFile(next(plain.glob("*.whl"))) as wheel:
        kernels = [n for n in wheel.namelist() if n.startswith("gradflow/_kernels.")]
    assert kernels == ["gradflow/_kernels.c"]
    (wheel_path,), (sdist_path,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        (library_name,) = [n for n in names if n.startswith("gradflow/_kernels.cpython")]
        assert "gradflow/_kernels.c" in names and "gradflow/_cbuild.py" in names
        wheel.extract(library_name, tmp_path)
    extracted = tmp_path / library_name
    library = native.load(extracted)
    assert library is not None
    assert native.built_from(library) == native.source_digest(project / "gradflow" / native.SOURCE)
    # Never built for this machine alone: no -march in the build, and the AVX2 and
    # baseline variants are both in the library (chosen per CPU when it loads).
    assert not any(flag.startswith("-march") for flag in native.CFLAGS)
    if os.uname().machine == "x86_64":
        symbols = extracted.read_bytes()
        assert b"gradflow_reduce_f32.avx2" in symbols and b"gradflow_reduce_f32.default" in symbols
    with tarfile.open(sdist_path) as sdist:
        members = {"/".join(Path(m).parts[1:]) for m in sdist.getnames()}
    assert {"gradflow/_kernels.c", "setup.py", "gradflow/_cbuild.py"} <= members
