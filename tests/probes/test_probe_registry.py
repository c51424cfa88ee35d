"""The probe registry, and a new probe added by one class and its registration alone.

The new probe (``abs_output``: the sum of |output| per layer call) is recorded through the
Recorder and the writer; its statistic in the run file is checked against plain float64
torch on the same layer outputs (rtol 1e-6: float32 outputs summed in float64, stored as
float32).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradflowError, Recorder, open_run, statistics
from gradflow.names import BUILTIN_PROBES, DEFAULT_PROBES
from gradflow.probes import PROBES, CallLog, CallProbe, register
from gradflow.statistics import STATISTICS

SCOPE_METHODS = {
    "step": ("before_step", "after_step", "pack"),
    "call": ("on_output", "new_row"),
}


def test_registry_holds_the_built_in_probes() -> None:
    assert set(PROBES.names()) == BUILTIN_PROBES
    assert len(PROBES) == len(BUILTIN_PROBES)
    for key in PROBES:
        assert PROBES.get(key).name == key


def test_default_probes_are_built_in_without_repeats() -> None:
    # A new built-in need not be recorded by default: only the reverse is required.
    assert set(DEFAULT_PROBES) <= BUILTIN_PROBES
    assert len(set(DEFAULT_PROBES)) == len(DEFAULT_PROBES)


@pytest.mark.parametrize("name", sorted(BUILTIN_PROBES))
def test_each_probe_declares_its_columns_and_statistics(name: str) -> None:
    probe = PROBES.get(name)
    assert probe.scope in SCOPE_METHODS
    assert isinstance(probe.columns, tuple) and probe.columns
    assert all(isinstance(c, str) and c for c in probe.columns)
    assert len(set(probe.columns)) == len(probe.columns)
    assert set(probe.loss_scaled) <= set(probe.columns)
    assert statistics.names(name), f"no statistics for probe {name}"
    assert probe.__doc__ and probe.__doc__.strip()


def test_nonfinite_checks_happen_in_step_order() -> None:
    """Weights (forward input), outputs (forward), output gradients (backward), parameter
    gradients (end of backward): each probe's checks carry that order."""
    n_layers = 2
    bad = {
        "param": {"w_sq": np.full((1, n_layers), np.inf), "g_nonfinite": np.ones((1, n_layers))},
        "activation": {"nonfinite": np.ones((1, n_layers))},
        "grad_output": {"n": np.ones((1, n_layers)), "sum_sq": np.full((1, n_layers), np.nan)},
        "skip": {},  # no checks of its own: grad_output and param see the same gradients
    }
    checks = {
        check.what: check
        for name in sorted(BUILTIN_PROBES)
        for check in PROBES.get(name).nonfinite(bad[name])
    }
    in_order = sorted(checks, key=lambda what: checks[what].order)
    assert in_order == ["weight", "output", "output gradient", "gradient"]
    assert [checks[w].last_first for w in in_order] == [False, False, True, True]
    assert all(check.bad.all() for check in checks.values())


# -- a new probe: one class, one statistic, two registrations ---------------------------------
class AbsOutputProbe(CallProbe):
    """Sum of |output| of each layer call (a test probe): a column the kernels do not fill,
    computed by torch and handed to :meth:`CallProbe.append`."""

    name = "abs_output"
    columns = ("sum_abs",)

    def on_output(self, out: torch.Tensor, log: CallLog, layer_id: int, forward: bool) -> None:
        if forward:
            self.append(log, layer_id, out, out.detach().abs().sum(dtype=torch.float64)[None])


def test_kernel_reductions_refuse_columns_of_their_own() -> None:
    with pytest.raises(GradflowError, match="not the kernels'"):
        AbsOutputProbe().reduce(torch.ones(3), CallLog(), 0)


def test_appended_rows_survive_the_log_growing() -> None:
    probe, log = AbsOutputProbe(), CallLog()
    xs = [torch.full((2,), float(i)) for i in range(200)]  # the host rows start at 64
    for i, x in enumerate(xs):
        probe.on_output(x, log, i % 7, forward=True)
    (packed,) = log.tensors(["abs_output"])
    np.testing.assert_array_equal(packed.numpy(), [2.0 * i for i in range(200)])
    assert log.blocks(["abs_output"])["abs_output"].key == tuple(i % 7 for i in range(200))


def _mean_abs(r: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.asarray(r["sum_abs"], np.float64) / r["n"]


def _register(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register ``abs_output`` and its statistic into copies of the registries, which
    ``monkeypatch`` puts back when it is undone."""
    monkeypatch.setattr(PROBES, "_items", dict(PROBES._items))
    monkeypatch.setattr(STATISTICS, "_items", dict(STATISTICS._items))
    register(AbsOutputProbe)
    statistics.statistic("abs_output", "mean_abs", "mean |output| of the layer")(_mean_abs)


@pytest.fixture
def abs_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """``abs_output`` and its statistic registered for one test."""
    _register(monkeypatch)


def _training(path, steps: int) -> list[dict[str, float]]:
    """Train a small model with the Recorder; the float64 mean |output| of each layer per
    step, by the test's own hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            seen.setdefault(name, []).append(out.detach().double().clone())

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(keep(name))
    g = torch.Generator().manual_seed(1)
    want = []
    with Recorder(model, opt, path, probes=("param", "abs_output")):
        for _ in range(steps):
            seen.clear()
            opt.zero_grad()
            x, y = torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)
            # Layer 2 is called twice in a step: its calls are summed.
            h = model[1](model[0](x))
            h = model[2](model[2](h))
            nn.functional.mse_loss(model[3](h), y).backward()
            opt.step()
            want.append(
                {n: float(torch.cat(o).abs().sum() / torch.cat(o).numel()) for n, o in seen.items()}
            )
    return want


def test_new_probe_is_one_class_and_its_registration(abs_output: None, tmp_path) -> None:
    assert "abs_output" in PROBES and statistics.names("abs_output") == ["mean_abs"]
    want = _training(tmp_path / "run.h5", steps=3)
    with open_run(tmp_path / "run.h5") as run:
        assert run.probes()["abs_output"] == ["mean_abs"]
        names = run.layer_names
        got = run.stat("abs_output", "mean_abs").astype(np.float64)
        grad_norm = run.stat("param", "grad_norm")
    assert names == ["0", "2", "3"]
    expected = np.array([[row[n] for n in names] for row in want])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.isfinite(grad_norm).all() and grad_norm.shape == (3, 3)


def test_registrations_are_undone() -> None:
    probes, stats = PROBES.names(), list(STATISTICS)
    with pytest.MonkeyPatch.context() as patch:
        _register(patch)
        assert PROBES.names() == [*probes, "abs_output"]
        assert list(STATISTICS) == [*stats, "abs_output/mean_abs"]
    assert PROBES.names() == probes and list(STATISTICS) == stats
