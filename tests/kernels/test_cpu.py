"""How the C kernels are delivered (the install-time extension, the per-user cached build,
torch operations with one warning, ``GRADFLOW_NATIVE``), the kernels' own edge cases
(:class:`~gradflow.kernels.cpu.ParamKernels`, :class:`~gradflow.kernels.host.HostRows`), and
recorded statistics with and without them. Their numbers against the float64 oracle:
tests/kernels/test_contract.py.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradflow.cli.main import main
from gradflow.errors import GradflowWarning
from gradflow.kernels import cached_build, cpu, host
from gradflow.probes import ActivationProbe, CallLog, GradOutputProbe
from gradflow.probes.grad_output import grad_output_hook
from gradflow.recorder import Recorder
from gradflow.runfile import open_run

REPO = Path(__file__).resolve().parents[2]
# The build without run-time dispatch compiles in a fifth of the time: the cache tests use it.
PORTABLE = ["-DGRADFLOW_PORTABLE"]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


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
    path, why = cpu.build_cached(cache)
    assert path is not None, why
    assert cpu.load(path) is not None
    # The compiler wrote a temporary file, renamed into place: never the final name.
    (line,) = runs(log)
    output = line.split(" -o ")[1]
    assert Path(output).parent == cache and Path(output).name.startswith(".build-")
    assert [p.name for p in cache.iterdir()] == [path.name]
    stamp = path.stat().st_mtime_ns
    assert cpu.build_cached(cache) == (path, "")
    code = (
        "from gradflow.kernels import cpu\n"
        "cpu.extension_path = lambda: None\n"  # as where pip built no extension
        "print(cpu.cpu_backend())\n"
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
        results.append(cpu.build_cached(cache, PORTABLE))

    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = {path for path, _ in results}
    assert len(results) == 4 and len(paths) == 1 and None not in paths
    (path,) = paths
    assert path is not None and cpu.load(path) is not None
    assert [p.name for p in cache.iterdir()] == [path.name]
    assert 1 <= len(runs(log)) <= 4


@needs_cc
def test_cache_key_follows_source_compiler_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    command = ["/usr/bin/cc", "-O3"]
    key = cached_build.cache_key(b"int x;", command)
    assert key == cached_build.cache_key(b"int x;", list(command))
    assert key != cached_build.cache_key(b"int y;", command)
    assert key != cached_build.cache_key(b"int x;", [*command, "-DGRADFLOW_PORTABLE"])
    assert key != cached_build.cache_key(b"int x;", ["/opt/cc", "-O3"])
    cache = tmp_path / "cache"
    first, _ = cpu.build_cached(cache, PORTABLE)
    # An edited source (here: one comment more) is built anew, under another name.
    edited = tmp_path / "package"
    edited.mkdir()
    source = (cpu.HERE / cpu.SOURCE).read_text() + "/* edited */\n"
    (edited / cpu.SOURCE).write_text(source)
    monkeypatch.setattr(cpu, "HERE", edited)
    changed, _ = cpu.build_cached(cache, PORTABLE)
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
    path, why = cpu.build_cached(cache)
    assert path is None and "internal error" in why
    assert list(cache.iterdir()) == []
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    path, why = cpu.build_cached(shared)
    assert path is None and "other users" in why
    assert list(shared.iterdir()) == []
    # A CC that is not a command line; an installation without the C source.
    monkeypatch.setenv("CC", '"cc')
    assert cpu.build_cached(cache) == (None, 'no C compiler: "cc not found')
    monkeypatch.setenv("CC", str(bad))
    monkeypatch.setattr(cpu, "HERE", tmp_path)
    path, why = cpu.build_cached(cache)
    assert path is None and why.endswith("is missing (reinstall gradflow)")


@pytest.fixture
def fresh_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The process's choice of kernels made again, with an empty cache and no extension."""
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(cpu, "extension_path", lambda: None)
    monkeypatch.delenv("GRADFLOW_NATIVE", raising=False)
    cpu._library.cache_clear()
    yield
    cpu._library.cache_clear()


def test_without_a_compiler_torch_operations_run_after_one_warning(
    fresh_choice: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = [cpu.kernel(), cpu.kernel(squares_only=True), cpu.param_kernels([3])]
        backend = cpu.cpu_backend()
    assert kernels == [None, None, None] and backend == "torch"
    (warning,) = caught
    assert warning.category is GradflowWarning
    text = str(warning.message)
    assert "no C compiler" in text and "20x" in text and "GRADFLOW_NATIVE=0" in text
    # Asking for torch operations: no warning.
    cpu._library.cache_clear()
    monkeypatch.setenv("GRADFLOW_NATIVE", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu.cpu_backend() == "torch" and cpu.kernel() is None
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
        assert cpu.cpu_backend() == "torch"
    (library,) = cpu.cache_dir().iterdir()
    assert str(library) in str(caught[0].message)


@needs_cc
def test_an_extension_built_from_another_source_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A package folder whose extension was built from the current source, then the source
    # edited (as in a checkout where _cpu.c changed since pip install -e).
    package = tmp_path / "package"
    package.mkdir()
    built, why = cpu.build_cached(tmp_path / "build", PORTABLE)
    assert built is not None, why
    shutil.copy(built, package / f"_cpu{importlib.machinery.EXTENSION_SUFFIXES[0]}")
    source = (cpu.HERE / cpu.SOURCE).read_text()
    monkeypatch.setattr(cpu, "HERE", package)
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADFLOW_NATIVE", raising=False)
    try:
        chosen = []
        for text in (source, source + "/* edited */\n"):
            (package / cpu.SOURCE).write_text(text)
            cpu._library.cache_clear()
            chosen.append(cpu.cpu_backend())
    finally:
        cpu._library.cache_clear()
    assert chosen == ["c-extension", "c-cached"]


# -- which backend ran ------------------------------------------------------------------------


@pytest.mark.parametrize("native_env", ["1", "0"], ids=["default", "GRADFLOW_NATIVE=0"])
def test_run_file_and_info_name_the_backend(
    native_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("GRADFLOW_NATIVE", native_env)
    cpu._library.cache_clear()
    try:
        expected = cpu.cpu_backend()
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 1, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = tmp_path / "run.h5"
        with Recorder(model, opt, path) as rec:
            opt.zero_grad()
            model(torch.randn(2, 1, 9, 9)).square().mean().backward()
            opt.step()
            rec.epoch_end()
    finally:
        cpu._library.cache_clear()
    if native_env == "0":
        assert expected == "torch"
    elif shutil.which("cc") is not None or cpu.extension_path() is not None:
        assert expected in ("c-extension", "c-cached", "c-private")
    assert open_run(path).attrs["kernel_backend"] == expected
    try:
        status = main(["info", str(path)])
    except SystemExit as done:
        status = done.code
    out, err = capsys.readouterr()
    assert not status, err
    (line,) = [x for x in out.splitlines() if x.startswith("kernels")]
    assert line.split() == ["kernels", expected]


# -- the kernels' edge cases ------------------------------------------------------------------


def test_param_kernels_copy_into_any_alignment_and_take_infinite_maxima() -> None:
    # The copy streams into 32-byte-aligned targets and copies the rest plainly: targets at
    # every offset modulo 8 floats get exact copies. The maximum of |d| is taken on the
    # bits of |d|: an infinite update is the maximum, a NaN makes it NaN, -0 counts as 0.
    sizes = [4099, 8, 1, 13, 5000, 3, 31, 64]
    kernels = cpu.param_kernels(sizes)
    if kernels is None:
        pytest.skip("no C compiler here: the native kernels are unavailable")
    gen = torch.Generator().manual_seed(5)
    sources = [torch.randn(n, generator=gen) for n in sizes]
    sources[2][0] = -0.0  # with after = +0.0: d = -0.0, whose bits would be the largest
    flat = torch.zeros(sum(sizes) + 64)
    targets, offset = [], 0
    for k, n in enumerate(sizes):
        offset += k  # shifts the start by 0..7 floats against the allocation
        targets.append(flat[offset : offset + n])
        offset += n
    w_sq = kernels.copy_squares(sources, targets).numpy()
    for s, t in zip(sources, targets, strict=True):
        assert torch.equal(s, t)
    np.testing.assert_allclose(w_sq, [float((s.double() ** 2).sum()) for s in sources], rtol=1e-6)

    after = [s.clone() for s in sources]
    after[0][17] = float("inf")
    after[1][3] = float("nan")
    after[2][0] = 0.0
    after[3] = -after[3]
    no_grads = [None] * len(sizes)
    d_sq, d_abs, g_dot_d, d_max = (t.numpy() for t in kernels.delta(targets, after, no_grads))
    assert (g_dot_d == 0.0).all()  # no gradient: no products
    d64 = [(t.double() - a.double()).abs().numpy() for t, a in zip(targets, after, strict=True)]
    assert d_max[0] == np.inf and np.isnan(d_max[1]) and d_max[2] == 0.0
    np.testing.assert_allclose(d_max[3:], [float(d.max()) for d in d64[3:]], rtol=1e-7)
    np.testing.assert_allclose(d_abs[2:], [float(d.sum()) for d in d64[2:]], rtol=1e-6)
    np.testing.assert_allclose(d_sq[2:], [float((d**2).sum()) for d in d64[2:]], rtol=1e-6)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_host_rows_grow_past_their_capacity_and_keep_every_call(native: bool) -> None:
    # 150 calls per step (rows start at 64 and are reallocated twice); output gradients
    # take the sum-of-squares-only path, activations the full one.
    if native and cpu.kernel() is None:
        pytest.skip("no C compiler here: the native kernel is unavailable")
    probe, gprobe, log = ActivationProbe(), GradOutputProbe(), CallLog()
    probe.host = host.HostReducer(native=native)
    gprobe.host = host.HostReducer(squares_only=True, native=native)
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(1 + 37 * i, generator=gen) for i in range(150)]
    hooks = [grad_output_hook(gprobe, lambda: log, i) for i in range(150)]
    for i, x in enumerate(xs):
        probe.reduce(x, log, i)
        hooks[i](2 * x)
    act, gout = (t.numpy() for t in log.tensors(["activation", "grad_output"]))
    act = act.reshape(-1, 4)
    a = [x.double().numpy() for x in xs]
    np.testing.assert_allclose(act[:, 0], [v.sum() for v in a], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(act[:, 1], [(v * v).sum() for v in a], rtol=1e-6)
    np.testing.assert_array_equal(act[:, 2], [np.count_nonzero(v) for v in a])
    np.testing.assert_array_equal(act[:, 3], 0)  # all entries finite
    np.testing.assert_allclose(gout, [(4 * v * v).sum() for v in a], rtol=1e-6)
    assert log.calls["activation"].ids == log.calls["grad_output"].ids == list(range(150))
    assert log.calls["grad_output"].n == [x.numel() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "shape, layout",
    [
        ((3, 5, 7, 9), torch.channels_last),
        ((2, 3, 4, 5, 6), torch.channels_last_3d),
        ((5, 4001), torch.contiguous_format),  # past the bfloat16 kernel's 8192-entry runs
    ],
    ids=["channels_last", "channels_last_3d", "contiguous"],
)
def test_dense_tensors_are_reduced_in_place_by_the_kernels(
    shape: tuple[int, ...],
    layout: torch.memory_format,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Convolutions on the CPU often give channels-last outputs and gradients (dense, not
    # contiguous), and CPU autocast bfloat16 ones. The call reductions do not depend on the
    # order of the entries, so the kernels read them in place; the torch operations (3-30x
    # slower) must not run.
    if cpu.kernel() is None:
        pytest.skip("no C compiler here: the native kernel is unavailable")

    def refused(*args: object) -> None:
        raise AssertionError("reduced by torch operations")

    monkeypatch.setattr(host.HostReducer, "torch_reductions", refused)
    monkeypatch.setattr(host, "sum_of_squares", refused)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
    x[0, 1] = 0.0
    assert x.is_contiguous() == (layout == torch.contiguous_format)
    probe, gprobe, log = ActivationProbe(), GradOutputProbe(), CallLog()
    probe.reduce(x, log, 0)
    grad_output_hook(gprobe, lambda: log, 0)(3 * x)
    act, gout = (t.numpy() for t in log.tensors(["activation", "grad_output"]))
    v = x.double().numpy()
    np.testing.assert_allclose(act[:2], [v.sum(), (v * v).sum()], rtol=1e-6)
    assert act[2] == np.count_nonzero(v) and act[3] == 0
    np.testing.assert_allclose(gout, [(3 * x).double().square().sum().item()], rtol=1e-6)


def test_recorded_statistics_agree_with_and_without_the_native_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cpu.kernel() is None:
        pytest.skip("no C compiler here: the native kernel is unavailable")
    runs = []
    for native in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        path = tmp_path / f"native{native}.h5"
        if not native:
            monkeypatch.setattr("gradflow.kernels.cpu.kernel", lambda **options: None)
            monkeypatch.setattr("gradflow.probes.snapshot.param_kernels", lambda sizes: None)
        with Recorder(model, opt, path) as rec:
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(2, 1, 12, 12)).square().mean().backward()
                opt.step()
            rec.epoch_end()
        runs.append(open_run(path))
    stats = [("activation", s) for s in ("mean", "std", "zero_fraction")]
    stats += [("grad_output", "norm"), ("epoch", "update_abs_mean")]
    stats += [("param", s) for s in ("grad_norm", "weight_norm", "update_norm", "update_abs_max")]
    for probe, stat in stats:
        np.testing.assert_allclose(
            runs[0].stat(probe, stat), runs[1].stat(probe, stat), rtol=1e-5, atol=1e-6, err_msg=stat
        )


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
        kernels = [n for n in wheel.namelist() if n.startswith("gradflow/kernels/_cpu.")]
    assert kernels == ["gradflow/kernels/_cpu.c"]
    (wheel_path,), (sdist_path,) = dist.glob("*.whl"), dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        (library_name,) = [n for n in names if n.startswith("gradflow/kernels/_cpu.cpython")]
        assert "gradflow/kernels/_cpu.c" in names and "gradflow/kernels/_cbuild.py" in names
        wheel.extract(library_name, tmp_path)
    extracted = tmp_path / library_name
    library = cpu.load(extracted)
    assert library is not None
    assert cpu.built_from(library) == cpu.source_digest(
        project / "gradflow" / "kernels" / cpu.SOURCE
    )
    # Never built for this machine alone: no -march in the build, and the AVX2 and
    # baseline variants are both in the library (chosen per CPU when it loads).
    assert not any(flag.startswith("-march") for flag in cpu.CFLAGS)
    if os.uname().machine == "x86_64":
        symbols = extracted.read_bytes()
        assert b"gradflow_reduce_f32.avx2" in symbols and b"gradflow_reduce_f32.default" in symbols
    with tarfile.open(sdist_path) as sdist:
        members = {"/".join(Path(m).parts[1:]) for m in sdist.getnames()}
    assert {"gradflow/kernels/_cpu.c", "setup.py", "gradflow/kernels/_cbuild.py"} <= members
