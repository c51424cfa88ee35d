"""The ``param`` probe against plain float64 torch and numpy.

Per-tensor reductions (``ParamReductions``) are checked around real optimizer steps against
float64 copies of the weights before, the gradients and the weights after, taken by the
test itself; per-layer reductions (``reduce_per_layer`` / ``ParamProbe.unpack``) against
numpy loops over hand-made per-tensor values.

Tolerances: float32 parameters are reduced from float32 values (the C kernels or float32
rows of 256 entries, summed in float64): rtol 1e-5; float64 parameters in float64: 1e-12.
Per-layer sums of float64 inputs are exact up to summation order: rtol 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

import gradflow.probes.snapshot as snapshot_module
from gradflow.layers import LayerSpec, discover_layers
from gradflow.probes import Attachment, Block, LayerMap, ParamProbe, ParamReductions
from gradflow.probes.param import COLUMNS, WIDTH, reduce_per_layer

# -- per-layer reductions from per-tensor vectors ----------------------------------------------


def _per_layer_reference(
    per_tensor: dict[str, np.ndarray], tensors_per_layer: Sequence[int]
) -> dict[str, np.ndarray]:
    """Plain loops: sums over a layer's tensors, max of d_max; gradient columns over the
    tensors that have a gradient (NaN g_nonfinite), NaN where none has."""
    n_rows = per_tensor["w_sq"].shape[0]
    out = {name: np.zeros((n_rows, len(tensors_per_layer))) for name in COLUMNS}
    for r in range(n_rows):
        start = 0
        for lay, count in enumerate(tensors_per_layer):
            idx = range(start, start + count)
            start += count
            has_grad = [i for i in idx if not math.isnan(per_tensor["g_nonfinite"][r, i])]
            for name in ("w_sq", "d_sq", "d_abs"):
                out[name][r, lay] = sum(per_tensor[name][r, i] for i in idx)
            out["d_max"][r, lay] = max(per_tensor["d_max"][r, i] for i in idx)
            for name in ("g_sq", "g_nonfinite", "g_dot_d"):
                values = [per_tensor[name][r, i] for i in has_grad]
                out[name][r, lay] = sum(values) if values else math.nan
    return out


def _pack(per_tensor: dict[str, np.ndarray]) -> np.ndarray:
    """[R, WIDTH x P]: each column's per-tensor values in turn, as the probe packs them."""
    return np.concatenate([per_tensor[name] for name in COLUMNS], axis=1)


def _random_per_tensor(rng: np.random.Generator, n_rows: int, n_tensors: int) -> dict:
    return {
        "w_sq": rng.uniform(0.1, 10, (n_rows, n_tensors)),
        "g_sq": rng.uniform(0.0, 3, (n_rows, n_tensors)),
        "g_nonfinite": rng.integers(0, 3, (n_rows, n_tensors)).astype(np.float64),
        "d_sq": rng.uniform(0.0, 1e-3, (n_rows, n_tensors)),
        "d_abs": rng.uniform(0.0, 1e-2, (n_rows, n_tensors)),
        "g_dot_d": rng.uniform(-1e-2, 1e-2, (n_rows, n_tensors)),
        "d_max": rng.uniform(0.0, 1e-2, (n_rows, n_tensors)),
    }


def test_reduce_per_layer_sums_and_maxima() -> None:
    rng = np.random.default_rng(0)
    tensors_per_layer = [2, 1, 3, 2]
    per_tensor = _random_per_tensor(rng, 3, sum(tensors_per_layer))
    starts = np.concatenate([[0], np.cumsum(tensors_per_layer)[:-1]])
    numel = np.array([7.0, 3.0, 11.0, 5.0])
    got = reduce_per_layer(_pack(per_tensor), starts, numel)
    want = _per_layer_reference(per_tensor, tensors_per_layer)
    assert set(got) == {*COLUMNS, "n"}
    np.testing.assert_array_equal(got["n"], np.broadcast_to(numel, (3, 4)))  # [R, L]
    for name in COLUMNS:
        assert got[name].shape == (3, 4)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)
    # The data tell a maximum from a sum.
    assert not np.allclose(got["d_max"], np.add.reduceat(per_tensor["d_max"], starts, axis=1))


def test_reduce_per_layer_one_row_vector() -> None:
    rng = np.random.default_rng(1)
    per_tensor = _random_per_tensor(rng, 1, 3)
    got = reduce_per_layer(_pack(per_tensor)[0], np.array([0, 2]), np.array([4.0, 2.0]))
    want = _per_layer_reference(per_tensor, [2, 1])
    for name in COLUMNS:
        assert got[name].shape == (2,)
        np.testing.assert_allclose(got[name], want[name][0], rtol=1e-12, err_msg=name)


def test_parameters_without_gradient() -> None:
    rng = np.random.default_rng(2)
    tensors_per_layer = [3, 2, 1]
    per_tensor = _random_per_tensor(rng, 2, 6)
    # Row 0: layer 0 has one tensor without a gradient, layer 1 none with one.
    # Row 1: every tensor has one.
    for i in (1, 3, 4):
        per_tensor["g_nonfinite"][0, i] = math.nan
        # what the probe stores for a missing gradient
        per_tensor["g_sq"][0, i] = per_tensor["g_dot_d"][0, i] = 0.0
    got = ParamProbe.unpack(
        _pack(per_tensor),
        [Block(WIDTH * 6)] * 2,
        LayerMap.of(_fake_layers(tensors_per_layer), np.arange(3)),
    )
    want = _per_layer_reference(per_tensor, tensors_per_layer)
    for name in COLUMNS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, err_msg=name)
    assert got["g_sq"][0, 0] == pytest.approx(per_tensor["g_sq"][0, [0, 2]].sum(), rel=1e-12)
    assert got["g_nonfinite"][0, 0] == per_tensor["g_nonfinite"][0, [0, 2]].sum()
    for name in ("g_sq", "g_nonfinite", "g_dot_d"):
        assert math.isnan(got[name][0, 1]), name
    assert np.isfinite(got["g_sq"][1]).all() and np.isfinite(got["g_nonfinite"][1]).all()
    # The other columns of a layer without gradients are still measured.
    for name in ("w_sq", "d_sq", "d_abs", "d_max"):
        assert np.isfinite(got[name]).all(), name
    np.testing.assert_array_equal(got["n"], [[1 + 2 + 3, 1 + 2, 1]] * len(got["w_sq"]))


def _fake_layers(tensors_per_layer: Sequence[int]) -> list[LayerSpec]:
    """Layers whose i-th tensor has i+1 elements."""
    layers = []
    for lay, count in enumerate(tensors_per_layer):
        params = [nn.Parameter(torch.zeros(i + 1)) for i in range(count)]
        layers.append(LayerSpec(f"l{lay}", nn.Identity(), params, reg_index=lay))
    return layers


# -- per-tensor reductions around real optimizer steps -----------------------------------------
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 4)
        self.unused = nn.Linear(3, 3)  # never in the forward: no gradients
        self.c = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _backward(model: Net, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    dtype = model.a.weight.dtype
    x = torch.randn(6, 5, generator=g, dtype=dtype)
    y = torch.randn(6, 3, generator=g, dtype=dtype)
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()


def _copies(params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().double().clone() for p in params]


def _expected(
    before: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    after: Sequence[torch.Tensor] | None,
) -> np.ndarray:
    """[WIDTH, P] in float64 (``after`` None: no update measured, NaN deltas)."""
    columns: dict[str, list[float]] = {name: [] for name in COLUMNS}
    for i, w in enumerate(before):
        g = grads[i]
        columns["w_sq"].append(float((w * w).sum()))
        columns["g_sq"].append(0.0 if g is None else float((g * g).sum()))
        columns["g_nonfinite"].append(math.nan if g is None else float((~torch.isfinite(g)).sum()))
        d = w - after[i] if after is not None else torch.full_like(w, math.nan)
        columns["d_sq"].append(float((d * d).sum()))
        columns["d_abs"].append(float(d.abs().sum()))
        # no update measured: NaN; no gradient: 0
        dot = math.nan if after is None else 0.0 if g is None else float((g * d).sum())
        columns["g_dot_d"].append(dot)
        columns["d_max"].append(float(d.abs().max()))
    return np.array([columns[name] for name in COLUMNS])


BACKENDS = ["float32", "float32-torch", "float64"]


def _setup(backend: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Net, list[LayerSpec], float]:
    if backend == "float32-torch":  # the Snapshot's torch reductions, as on accelerators
        monkeypatch.setattr(snapshot_module, "param_kernels", lambda sizes: None)
    torch.manual_seed(0)
    model = Net().to(torch.float64 if backend == "float64" else torch.float32)
    return model, discover_layers(model), 1e-12 if backend == "float64" else 1e-5


def _row(probe: ParamProbe) -> np.ndarray:
    packed = probe.pack()
    assert packed is not None
    vec, block = packed
    assert vec.dtype == torch.float64 and block.size == vec.numel()
    return vec.numpy().reshape(WIDTH, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_optimizer_against_float64(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, layers, rtol = _setup(backend, monkeypatch)
    params = [p for lay in layers for p in lay.params]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = ParamProbe()
    probe.attach(Attachment(layers, owners=[0] * len(params)))
    assert probe.pack() is None  # nothing measured yet
    for step in range(3):
        _backward(model, step)
        model.b.bias.grad = None  # a layer with one of its two tensors without gradient
        before, grads = _copies(params), [_grad(p) for p in params]
        probe.before_step(0)
        opt.step()
        probe.after_step(0, stepped=True, has_update=True)
        row = _row(probe)
        want = _expected(before, grads, _copies(params))
        np.testing.assert_allclose(row, want, rtol=rtol, atol=0, err_msg=f"step {step}")
        assert probe.pack() is None  # a row is handed out once

    # Per layer, against float64 sums over the layer's tensors.
    layer_map = LayerMap.of(layers, np.arange(len(layers)))
    per_layer = ParamProbe.unpack(row.reshape(1, -1), [Block(row.size)], layer_map)
    names = [lay.name for lay in layers]
    assert names == ["a", "b", "unused", "c"]
    b, unused = names.index("b"), names.index("unused")
    assert per_layer["g_sq"][0, b] == pytest.approx(_sum_sq(grads[2]), rel=rtol)
    assert math.isnan(per_layer["g_sq"][0, unused])
    assert math.isnan(per_layer["g_nonfinite"][0, unused])
    assert per_layer["d_sq"][0, unused] == 0.0  # Adam skips parameters without gradient
    w_sq_c = sum(float(w.square().sum()) for w in before[-2:])
    assert per_layer["w_sq"][0, -1] == pytest.approx(w_sq_c, rel=rtol)
    np.testing.assert_array_equal(per_layer["n"], [[5 * 7 + 7, 7 * 4 + 4, 12, 4 * 3 + 3]])


def _sum_sq(t: torch.Tensor | None) -> float:
    assert t is not None
    return float(t.square().sum())


def _grad(p: nn.Parameter) -> torch.Tensor | None:
    return None if p.grad is None else p.grad.detach().double().clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_optimizers_own_their_parameters(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, layers, rtol = _setup(backend, monkeypatch)
    params = [p for lay in layers for p in lay.params]
    # Layer b split between both optimizers; c's bias with the second.
    owners = [0, 0, 1, 0, 0, 0, 0, 1]
    assert _param_names(layers)[2] == "b.weight" and _param_names(layers)[7] == "c.bias"
    groups = [[p for p, o in zip(params, owners, strict=True) if o == k] for k in (0, 1)]
    opts = [torch.optim.SGD(groups[0], lr=0.1, momentum=0.9), torch.optim.Adam(groups[1], lr=0.01)]
    probe = ParamProbe()
    probe.attach(Attachment(layers, owners))
    for step in range(2):
        _backward(model, step)
        before, grads = _copies(params), [_grad(p) for p in params]
        for k, opt in enumerate(opts):
            probe.before_step(k)
            opt.step()
            probe.after_step(k, stepped=True, has_update=True)
        row = _row(probe)
        want = _expected(before, grads, _copies(params))
        np.testing.assert_allclose(row, want, rtol=rtol, atol=0, err_msg=f"step {step}")

    # Only the first optimizer steps: the second's tensors are NaN in every column.
    _backward(model, 5)
    before, grads = _copies(params), [_grad(p) for p in params]
    probe.before_step(0)
    opts[0].step()
    probe.after_step(0, stepped=True, has_update=True)
    row = _row(probe)
    want = _expected(before, grads, _copies(params))
    second = np.array(owners) == 1
    assert np.isnan(row[:, second]).all()
    np.testing.assert_allclose(row[:, ~second], want[:, ~second], rtol=rtol, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_step_and_no_update(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, layers, rtol = _setup(backend, monkeypatch)
    params = [p for lay in layers for p in lay.params]
    probe = ParamProbe()
    probe.attach(Attachment(layers, owners=[0] * len(params)))

    # A GradScaler-style skip: non-finite gradients, no optimizer step, zero updates.
    _backward(model, 0)
    grad_a, grad_c = model.a.weight.grad, model.c.bias.grad
    assert grad_a is not None and grad_c is not None
    grad_a[0, :2] = torch.tensor([math.inf, math.nan])
    grad_c[1] = -math.inf
    before, grads = _copies(params), [_grad(p) for p in params]
    probe.before_step(0)
    probe.after_step(0, stepped=False, has_update=True)
    row = _row(probe)
    want = _expected(before, grads, before)
    np.testing.assert_allclose(row[:3], want[:3], rtol=rtol, atol=0)
    assert (row[3:] == 0).all()
    g_nonfinite = dict(zip(_param_names(layers), row[2], strict=True))
    assert g_nonfinite["a.weight"] == 2 and g_nonfinite["c.bias"] == 1
    assert g_nonfinite["b.weight"] == 0 and math.isnan(g_nonfinite["unused.weight"])

    # A backward pass without an optimizer: gradients and weights, NaN updates.
    _backward(model, 1)
    before, grads = _copies(params), [_grad(p) for p in params]
    probe.before_step(0)
    probe.after_step(0, stepped=True, has_update=False)
    row = _row(probe)
    want = _expected(before, grads, None)
    np.testing.assert_allclose(row, want, rtol=rtol, atol=0)
    assert np.isnan(row[3:]).all()


def _param_names(layers: Sequence[LayerSpec]) -> list[str]:
    """``layer.parameter`` of each recorded tensor, in layer order."""
    names = []
    for lay in layers:
        owned = {id(p): n for n, p in lay.module.named_parameters()}
        names += [f"{lay.name}.{owned[id(p)]}" for p in lay.params]
    return names


def test_after_step_without_before_step_measures_nothing() -> None:
    layers = discover_layers(Net())
    reductions = ParamReductions(layers)
    reductions.after_step(0)
    assert reductions.row() is None


# -- non-finite checks -------------------------------------------------------------------------
def test_nonfinite_checks_in_step_order() -> None:
    reductions = {
        "w_sq": np.array([[1.0, math.inf, 2.0, math.nan]]),
        "g_nonfinite": np.array([[3.0, 0.0, math.nan, 1.0]]),
    }
    checks = ParamProbe.nonfinite(reductions)
    by_what = {check.what: check for check in checks}
    assert set(by_what) == {"weight", "gradient"}
    weight, gradient = by_what["weight"], by_what["gradient"]
    np.testing.assert_array_equal(weight.bad, [False, True, False, True])
    # A missing gradient (NaN count) is not a non-finite gradient.
    np.testing.assert_array_equal(gradient.bad, [True, False, False, True])
    # Weights are used by the forward, before anything else; gradients come last, from the
    # last layer back.
    assert weight.order < gradient.order and not weight.last_first and gradient.last_first


def test_attached_without_owners_every_parameter_is_the_first_optimizers() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    layers = discover_layers(model)
    model(torch.ones(2, 3)).sum().backward()
    probe = ParamProbe()
    probe.attach(Attachment(layers))
    probe.before_step(0)
    probe.after_step(0, True, True)
    packed = probe.pack()
    assert packed is not None and packed[1].size == len(COLUMNS) * 4
    g_sq = packed[0].view(len(COLUMNS), -1)[COLUMNS.index("g_sq")]
    want = [float(p.grad.double().square().sum()) for p in model.parameters()]
    np.testing.assert_allclose(g_sq.numpy(), want, rtol=1e-6)
    with pytest.raises(ValueError, match="1 owners for 4 parameters"):
        ParamReductions(layers, owners=[0])
