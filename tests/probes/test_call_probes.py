"""Per-call probes (``activation``, ``grad_output``) and their call logs, against numpy and
plain autograd.

Per-call columns are checked against float64 numpy sums of the tensors' values (rtol 1e-6:
float32 entries summed in float64 or in float32 blocks; half types in float32); per-layer
sums of float64 inputs to rtol 1e-12; output-gradient norms recorded through a model under
activation checkpointing (reentrant or not) against plain autograd on the same weights to
rtol 1e-6.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradflow import GradflowError, Recorder, open_run
from gradflow.kernels import CALL_COLUMNS
from gradflow.kernels import device as device_kernels
from gradflow.probes import ActivationProbe, Block, CallLog, CallProbe, GradOutputProbe, LayerMap
from gradflow.probes.calls import CallRows

RTOL = 1e-6


def _columns(x: torch.Tensor, names: Sequence[str]) -> list[float]:
    """The per-call columns in float64 numpy."""
    a = x.detach().to(torch.float64).numpy().reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        values = {
            "sum": a.sum(),
            "sum_sq": (a * a).sum(),
            "nonzero": float(np.count_nonzero(a)),
            "nonfinite": float((~np.isfinite(a)).sum()),
        }
    return [float(values[name]) for name in names]


def _tensors(seed: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i, 5, generator=g) + 2.0 for i in range(count)]


# -- CallLog ----------------------------------------------------------------------------------
def test_blocks_and_tensors_follow_the_given_order() -> None:
    act, gout = ActivationProbe(), GradOutputProbe()
    xs = _tensors(0, 4)
    log = CallLog()
    gout.reduce(xs[0], log, 2)  # the output-gradient probe is called first
    act.reduce(xs[1], log, 0)
    gout.reduce(xs[2], log, 1)
    act.reduce(xs[3], log, 2)
    assert list(log.calls) == ["grad_output", "activation"]
    for order in (("activation", "grad_output"), ("grad_output", "activation")):
        blocks = log.blocks(order)
        assert list(blocks) == list(order)
        tensors = log.tensors(order)
        assert [t.numel() for t in tensors] == [blocks[name].size for name in order]
    blocks = log.blocks(("activation", "grad_output"))
    assert blocks["activation"] == Block(8, (0, 2), (xs[1].numel(), xs[3].numel()))
    assert blocks["grad_output"] == Block(2, (2, 1), (xs[0].numel(), xs[2].numel()))
    act_t, gout_t = log.tensors(("activation", "grad_output"))
    want_act = _columns(xs[1], CALL_COLUMNS) + _columns(xs[3], CALL_COLUMNS)
    np.testing.assert_allclose(act_t.numpy(), want_act, rtol=RTOL)
    want_gout = _columns(xs[0], ["sum_sq"]) + _columns(xs[2], ["sum_sq"])
    np.testing.assert_allclose(gout_t.numpy(), want_gout, rtol=RTOL)
    # Probes outside the order are left out; names not logged are skipped.
    assert list(log.blocks(("param", "grad_output"))) == ["grad_output"]
    assert len(log.tensors(("param", "grad_output"))) == 1


def _log(act_calls: Sequence[tuple[int, torch.Tensor]], gout_calls, hook_s: float) -> CallLog:
    act, gout = ActivationProbe(), GradOutputProbe()
    log = CallLog(hook_s=hook_s)
    for layer, x in act_calls:
        act.reduce(x, log, layer)
    for layer, x in gout_calls:
        gout.reduce(x, log, layer)
    return log


def test_merged_logs_concatenate_calls_in_order() -> None:
    xs = _tensors(1, 7)
    logs = [
        _log([(0, xs[0]), (1, xs[1])], [(1, xs[2])], 0.5),
        _log([], [(0, xs[3]), (1, xs[4])], 0.25),
        CallLog(hook_s=0.125),  # no calls at all
        _log([(1, xs[5])], [(0, xs[6])], 1.0),
    ]
    order = ("activation", "grad_output")
    merged = CallLog.merged(logs, order)
    assert merged.hook_s == 1.875
    blocks = merged.blocks(order)
    assert list(blocks) == list(order)
    assert blocks["activation"].key == (0, 1, 1)
    assert blocks["activation"].counts == tuple(xs[i].numel() for i in (0, 1, 5))
    assert blocks["activation"].size == 3 * 4
    assert blocks["grad_output"].key == (1, 0, 1, 0)
    assert blocks["grad_output"].counts == tuple(xs[i].numel() for i in (2, 3, 4, 6))
    (vec,) = merged.tensors(order)  # one vector: activation blocks, then grad_output's
    want = [v for i in (0, 1, 5) for v in _columns(xs[i], CALL_COLUMNS)]
    want += [v for i in (2, 3, 4, 6) for v in _columns(xs[i], ["sum_sq"])]
    assert vec.numel() == sum(b.size for b in blocks.values())
    np.testing.assert_allclose(vec.numpy(), want, rtol=RTOL)


def test_merging_one_log_keeps_it() -> None:
    xs = _tensors(2, 1)
    only = _log([(0, xs[0])], [], 0.5)
    merged = CallLog.merged([CallLog(hook_s=1.0), only, CallLog()], ("activation",))
    assert merged is only and merged.hook_s == 1.5
    assert merged.reduced is None
    np.testing.assert_allclose(
        merged.tensors(("activation",))[0].numpy(), _columns(xs[0], CALL_COLUMNS), rtol=RTOL
    )
    empty = CallLog.merged([CallLog(hook_s=0.25)], ("activation",))
    assert empty.calls == {} and empty.tensors(("activation",)) == [] and empty.hook_s == 0.25


# -- per-layer sums --------------------------------------------------------------------------
@pytest.mark.parametrize("probe", [ActivationProbe, GradOutputProbe])
def test_unpack_sums_calls_per_layer(probe: type[CallProbe]) -> None:
    rng = np.random.default_rng(0)
    k = len(probe.columns)
    ids = (3, 0, 3, 1)  # layer 3 called twice; layers 2 and 4 never
    reg_to_layer = np.array([2, 4, 0, 1, 3])  # registration index -> column
    n_rows = 3
    calls = rng.normal(size=(n_rows, len(ids), k))
    counts = rng.integers(1, 100, (n_rows, len(ids)))
    blocks = [Block(len(ids) * k, ids, tuple(int(c) for c in row)) for row in counts]
    layer_map = LayerMap(5, reg_to_layer, np.zeros(0, np.int64), np.zeros(0))
    got = probe.unpack(calls.reshape(n_rows, -1), blocks, layer_map)
    want = {name: np.full((n_rows, 5), np.nan) for name in (*probe.columns, "n")}
    for r in range(n_rows):
        for c, reg in enumerate(ids):
            col = reg_to_layer[reg]
            for j, name in enumerate(probe.columns):
                want[name][r, col] = np.nan_to_num(want[name][r, col]) + calls[r, c, j]
            want["n"][r, col] = np.nan_to_num(want["n"][r, col]) + counts[r, c]
    assert set(got) == set(want)
    for name, values in want.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-12, err_msg=name)
    # Uncalled layers (registration 2 and 4) are NaN in every column.
    for name in want:
        assert np.isnan(got[name][:, reg_to_layer[[2, 4]]]).all()
        assert np.isfinite(got[name][:, reg_to_layer[[0, 1, 3]]]).all()


def test_unpack_without_calls() -> None:
    layer_map = LayerMap(2, np.array([1, 0]), np.zeros(0, np.int64), np.zeros(0))
    got = ActivationProbe.unpack(np.zeros((2, 0)), [Block(0, (), ())] * 2, layer_map)
    assert all(v.shape == (2, 2) and np.isnan(v).all() for v in got.values())


# -- host and device rows ---------------------------------------------------------------------
def _mixed_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 33, generator=g)
    with_zeros = torch.relu(base)
    bad = base.clone()
    bad[1, 2], bad[5, 7] = math.nan, math.inf
    inf_only = base.clone()
    inf_only[0, 0] = math.inf
    # Contiguous float32 tensors go through the C kernels on the host, the others through
    # torch operations: each case in both.
    return [
        base + 3.0,  # far from zero: the sums are rebuilt around a shift
        (base + 3.0).double(),
        base.t(),  # not contiguous
        with_zeros,
        with_zeros.t(),
        base.double(),
        base.half(),
        base.bfloat16(),
        bad,
        bad.double(),
        inf_only,
        inf_only.t(),
        torch.zeros(0),
    ]


@pytest.mark.parametrize("probe", [ActivationProbe, GradOutputProbe])
def test_cpu_and_device_rows_agree(probe: type[CallProbe]) -> None:
    """The device kernels (torch operations, run here on CPU tensors) and the host kernels
    fill the same columns."""
    p = probe()
    xs = _mixed_tensors()
    host, device = CallLog(), CallLog()
    rows = device.calls[p.name] = CallRows(device_kernels.call_rows(torch.device("cpu"), p.columns))
    for layer, x in enumerate(xs):
        p.reduce(x, host, layer)
        device_kernels.reduce_into(x, rows.rows)  # type: ignore[arg-type]
        rows.ids.append(layer)
        rows.n.append(x.numel())
    order = (p.name,)
    assert host.blocks(order) == device.blocks(order)
    k = len(p.columns)
    got_host = host.tensors(order)[0].numpy().reshape(len(xs), k)
    got_device = device.tensors(order)[0].numpy().reshape(len(xs), k)
    for i, x in enumerate(xs):
        want = _columns(x, p.columns)
        np.testing.assert_allclose(got_host[i], want, rtol=RTOL, atol=1e-9, err_msg=f"host {i}")
        np.testing.assert_allclose(got_device[i], want, rtol=RTOL, atol=1e-9, err_msg=f"dev {i}")


def test_cpu_and_device_rows_do_not_mix() -> None:
    probe = ActivationProbe()
    elsewhere = torch.empty(4, device="meta")  # not a CPU tensor; nothing is computed
    log = CallLog()
    probe.reduce(torch.ones(4), log, 0)
    with pytest.raises(GradflowError, match=r"several devices .*\(activation probe\)"):
        probe.reduce(elsewhere, log, 1)
    other = CallLog()
    other.rows_for(probe, elsewhere)  # device rows first
    with pytest.raises(GradflowError, match="several devices"):
        probe.reduce(torch.ones(4), other, 0)
    assert log.calls["activation"].ids == [0]


# -- output gradients under activation checkpointing ---------------------------------------
class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        """``reentrant`` None: no checkpointing."""
        super().__init__()
        self.reentrant = reentrant
        self.inp = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if self.reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.out(torch.tanh(h))


def _plain_grad_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """float64 norms of dL/d(output) of each Linear by plain autograd (retain_grad)."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            out.retain_grad()
            outputs[name] = out

        return hook

    handles = [
        m.register_forward_hook(keep(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    nn.functional.mse_loss(model(x), y).backward()
    for h in handles:
        h.remove()
    norms = {}
    for name, out in outputs.items():
        assert out.grad is not None, name
        norms[name] = float(out.grad.double().norm())
    return norms


@pytest.mark.parametrize("reentrant", [True, False])
def test_grad_output_under_activation_checkpointing(tmp_path, reentrant: bool) -> None:
    """Reentrant checkpointing runs the block without grad and recomputes it in backward,
    where its output gradients flow; non-reentrant checkpointing recomputes only what
    backward saved."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    twin = copy.deepcopy(model)
    twin.reentrant = None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    want: list[dict[str, float]] = []
    path = tmp_path / "run.h5"
    with Recorder(model, opt, path, probes=("param", "grad_output")):
        for _ in range(3):
            x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
            twin.load_state_dict(model.state_dict())
            twin.zero_grad()
            want.append(_plain_grad_outputs(twin, x, y))
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    with open_run(path) as run:
        names = run.layer_names
        assert names == ["inp", "block.0", "block.2", "out"]
        norm = run.stat("grad_output", "norm").astype(np.float64)
        rms = run.stat("grad_output", "rms").astype(np.float64)
        sizes = {"inp": 5 * 8, "block.0": 5 * 8, "block.2": 5 * 8, "out": 5 * 3}
    expected = np.array([[row[n] for n in names] for row in want])
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(norm, expected, rtol=RTOL)
    expected_rms = expected / np.sqrt([sizes[n] for n in names])
    np.testing.assert_allclose(rms, expected_rms, rtol=RTOL)
