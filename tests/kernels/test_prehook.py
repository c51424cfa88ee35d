"""The C++ output-gradient hooks (:mod:`gradflow.kernels.prehook`): each row against numpy
float64 sums of the gradient autograd computes (rtol 1e-6 for float32 and bfloat16
gradients, 1e-12 for float64 ones through ATen), recordings through them against the same
recordings through the Python hooks (rtol 1e-6), the order of calls across ranks, and
where the library is not built or not loaded (an unsafe folder, a planted file,
``GRADFLOW_NATIVE=0``, compiled autograd)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import Recorder, open_run
from gradflow.kernels import prehook
from gradflow.kernels.cached_build import Failed, cache_key
from gradflow.probes import CallLog, GradOutputProbe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sink() -> prehook.SquaresSink:
    made = prehook.squares_sink(wait=True)
    if made is None:
        pytest.skip(f"the C++ hooks are not built here: {prehook.why_not()}")
    return made


def _sum_sq(t: torch.Tensor) -> float:
    a = t.detach().to(torch.float64).numpy()
    return float((a * a).sum())


@pytest.mark.parametrize(
    ("dtype", "layout", "rtol"),
    [
        (torch.float32, "contiguous", 1e-6),
        (torch.float32, "channels_last", 1e-6),
        (torch.float32, "transposed", 1e-6),  # not dense: through ATen
        (torch.bfloat16, "contiguous", 1e-6),
        (torch.float16, "contiguous", 1e-6),
        (torch.float64, "contiguous", 1e-12),
    ],
)
def test_rows_are_the_gradients_sums_of_squares(
    sink: prehook.SquaresSink, dtype: torch.dtype, layout: str, rtol: float
) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 17, 19, generator=g) + 1.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = x * 2
    if layout == "transposed":
        y = y.transpose(1, 3)
    seen: dict[str, torch.Tensor] = {}
    y.register_hook(lambda grad: seen.setdefault("y", grad))
    assert sink.watch(y, 5) == 1
    weights = torch.randn(y.shape, generator=g).to(dtype)
    (y * weights).float().sum().backward()
    sums, layers, sizes, seconds = sink.take()
    assert layers.tolist() == [5] and sizes.tolist() == [y.numel()]
    np.testing.assert_allclose(sums, [_sum_sq(seen["y"])], rtol=rtol)
    assert seconds > 0.0
    assert sink.take()[0].size == 0  # taken once


def test_an_output_used_twice_gives_one_row_of_the_summed_gradient(
    sink: prehook.SquaresSink,
) -> None:
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.tanh(x)
    assert sink.watch(y, 1) == 1
    (2 * y + y.square()).sum().backward(retain_graph=True)
    want = 2 + 2 * y.detach()
    (y * 3).sum().backward()  # a second backward through the same node: a second row
    sums, layers, _, _ = sink.take()
    assert layers.tolist() == [1, 1]
    np.testing.assert_allclose(sums, [_sum_sq(want), 9.0 * y.numel()], rtol=1e-6)


def test_leaves_non_tensors_and_unused_outputs(sink: prehook.SquaresSink) -> None:
    leaf = torch.randn(3, requires_grad=True)
    assert sink.watch(leaf, 0) == 0
    assert sink.watch("not a tensor", 0) == -1  # type: ignore[arg-type]
    first, second = (leaf * 2).chunk(2)  # output 1 of the node gets no gradient
    assert sink.watch(second, 3) == 1
    first.sum().backward()
    assert sink.take()[0].size == 0


def test_a_graph_kept_past_its_sink_runs_after_the_sink_is_closed() -> None:
    sink = prehook.squares_sink(wait=True)
    if sink is None:
        pytest.skip(f"the C++ hooks are not built here: {prehook.why_not()}")
    x = torch.randn(4, requires_grad=True)
    y = x * 3
    sink.watch(y, 0)
    sink.close()
    del sink
    y.sum().backward()  # the hook keeps its sink alive: no crash, nobody reads the row
    assert x.grad is not None and torch.equal(x.grad, torch.full((4,), 3.0))


class _Net(nn.Module):
    """Convolutions with batch norm in channels-last, a layer called twice, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.twice = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        h = self.twice(torch.relu(self.twice(h)))
        return self.head(h.mean((2, 3)))


def _record(path: Path, native: bool, autocast: bool) -> bool:
    """Record 3 steps; whether the C++ hooks measured them."""
    torch.manual_seed(0)
    model = _Net().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    python_only = mock.patch.object(prehook, "squares_sink", lambda wait=False: None)
    with Recorder(model, opt, path, probes=("grad_output",)) as rec:
        with contextlib.nullcontext() if native else python_only:
            for _ in range(3):
                x = torch.randn(4, 3, 12, 12, generator=g)
                opt.zero_grad()
                with torch.autocast("cpu", enabled=autocast):
                    out = model(x.contiguous(memory_format=torch.channels_last))
                out.float().square().mean().backward()
                opt.step()
        return any(getattr(probe, "_sink", None) is not None for probe in rec._call_probes)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bfloat16"])
def test_recordings_through_the_cxx_hooks_match_the_python_hooks(
    tmp_path: Path, sink: prehook.SquaresSink, autocast: bool
) -> None:
    for native in (True, False):
        assert _record(tmp_path / f"{native}.h5", native, autocast) == native
    with open_run(tmp_path / "True.h5") as cxx, open_run(tmp_path / "False.h5") as python:
        for name in ("norm", "rms"):
            got, want = cxx.stat("grad_output", name), python.stat("grad_output", name)
            assert np.isfinite(want).all()
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_probe_uses_the_cxx_hooks_on_the_cpu(sink: prehook.SquaresSink) -> None:
    probe = GradOutputProbe()
    log = CallLog()
    probe.attach(mock.Mock(current_log=lambda: log))
    x = torch.randn(5, 4, requires_grad=True)
    y = x * 2
    probe.on_output(y, log, 4, forward=True)
    y.square().sum().backward()
    assert "grad_output" not in log.calls  # in the sink until collected
    probe.collect(log)
    rows = log.calls["grad_output"]
    assert rows.ids == [4] and rows.n == [20]
    np.testing.assert_allclose(rows.tensor().numpy(), [_sum_sq(2 * y)], rtol=1e-6)
    assert log.hook_s > 0.0
    probe.detach()


def test_compiled_autograd_keeps_the_python_hooks(sink: prehook.SquaresSink) -> None:
    probe = GradOutputProbe()
    log = CallLog()
    probe.attach(mock.Mock(current_log=lambda: log))
    x = torch.randn(5, requires_grad=True)
    y = x * 2
    with mock.patch.object(prehook, "compiled_autograd", lambda: True):
        probe.on_output(y, log, 0, forward=True)
    y.sum().backward()
    assert log.calls["grad_output"].ids == [0]  # reduced by the Python hook at once
    probe.collect(log)
    assert log.calls["grad_output"].ids == [0]
    probe.detach()


def test_ranks_that_logged_the_same_calls_in_another_order_reduce_them_alike() -> None:
    """Calls through the Python hooks are logged as backward reaches them, those through
    the C++ hooks when collected: ranks may order the same calls differently."""
    probe = GradOutputProbe()
    logs = []
    for order in ([2, 0, 1, 0], [0, 0, 1, 2]):
        log = CallLog()
        sizes = {0: [10, 11], 1: [12], 2: [13]}
        values = {0: [1.0, 2.0], 1: [3.0], 2: [4.0]}
        seen = dict.fromkeys(sizes, 0)
        ids, ns, vals = [], [], []
        for layer in order:
            k = seen[layer]
            seen[layer] += 1
            ids.append(layer)
            ns.append(sizes[layer][k])
            vals.append(values[layer][k])
        log.extend(probe, np.array(vals)[:, None], ids, ns)
        logs.append(log)
    with mock.patch("torch.distributed.all_reduce"):  # one rank: the sum is the values
        reduced = [log.all_reduce(1, ["grad_output"]) for log in logs]
    for log in reduced:
        assert log.calls["grad_output"].ids == [0, 0, 1, 2]
        assert log.calls["grad_output"].n == [10, 11, 12, 13]
        assert log.tensors(["grad_output"])[0].tolist() == [1.0, 2.0, 3.0, 4.0]


# -- where the library is not used ------------------------------------------------------------
@pytest.fixture
def command() -> tuple[list[str], list[str]]:
    try:
        return prehook.command()
    except Failed as err:
        pytest.skip(f"cannot build the C++ hooks here: {err}")


@pytest.mark.usefixtures("command")
def test_an_unsafe_cache_folder_builds_nothing(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    functions, why = prehook._build_and_load(shared)
    assert functions is None and "can be written by other users" in why
    assert not list(shared.glob("prehook-*.so"))


def test_a_planted_library_is_not_loaded(
    tmp_path: Path, command: tuple[list[str], list[str]]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    key = cache_key(prehook.SOURCE.read_bytes(), [*command[0], *command[1]])
    planted = cache / f"prehook-{key}.so"
    planted.write_bytes(b"\x7fELF not a library")
    os.chmod(planted, 0o600)
    functions, why = prehook._build_and_load(cache)
    assert functions is None and "does not load" in why
    os.chmod(planted, 0o620)  # writable by the group: not even opened
    assert prehook.load(planted) is None


def test_gradflow_native_0_chooses_the_python_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADFLOW_NATIVE", "0")
    build = prehook._Build()
    build.ask()
    assert build.done.is_set() and build.functions is None
    assert build.why == "GRADFLOW_NATIVE=0"


def test_a_built_library_is_loaded_at_the_first_call(sink: prehook.SquaresSink) -> None:
    build = prehook._Build()  # the cache folder of every test holds it: conftest builds it first
    build.ask()
    assert build.done.is_set() and build.functions is not None and not build.started


@pytest.mark.usefixtures("command")
def test_the_build_starts_only_after_recording_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "empty"))
    built = []
    monkeypatch.setattr(
        prehook, "_build_and_load", lambda folder: built.append(folder) or (None, "x")
    )
    clock = [100.0]
    monkeypatch.setattr(prehook.time, "monotonic", lambda: clock[0])
    build = prehook._Build()
    build.ask()
    clock[0] += prehook.BUILD_AFTER_S - 1
    build.ask()
    assert not build.started and not build.done.is_set()  # a short run builds nothing
    clock[0] += 1
    build.ask()
    assert build.started and build.done.wait(10)
    assert built == [tmp_path / "empty"] and build.why == "x"


def test_an_error_while_loading_leaves_the_python_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    build = prehook._Build()
    monkeypatch.setattr(build, "_load_cached", lambda: 1 / 0)
    build.ask()  # inside a forward hook: never an error in the training step
    assert build.done.is_set() and build.functions is None
    assert build.why.startswith("ZeroDivisionError")
