"""Every registered statistic against numpy on the raw per-layer arrays it summarises.

The reductions are built from random raw arrays the way the probes define them (see the
docstring of :mod:`gradflow.statistics`); each statistic computed from them must agree with
an independent numpy computation on the raw arrays. Every test runs with warnings as errors:
the host computation must stay silent on NaN, Inf, empty layers and divisions by zero.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from gradflow import statistics
from gradflow.registry import Registry
from gradflow.statistics import STATISTICS, Reductions

pytestmark = pytest.mark.filterwarnings("error")

# Reductions and references are both float64 sums over at most 4096 elements, taken in
# different orders (np.sum of squares against np.linalg.norm, one-pass against two-pass
# variance): 1e-14 relative at most measured, when |mean| is not much above std.
RTOL = 1e-12
# The one-pass variance E[x^2] - mean^2 loses about eps * (mean / std)^2 relative: about
# 2e-10 measured at mean 1e3, std 1 (20 seeds of 10^4 elements), four times that expected
# at std 0.5, so 1e-8 there.
RTOL_OFFSET = 1e-8

PROBES = ("param", "epoch", "activation", "grad_output", "skip")


@dataclass(frozen=True)
class Layer:
    """Raw arrays of one layer: weights before and after an update (for ``epoch``, at the
    start and end of the epoch), the gradient, the layer's output and its gradient."""

    w_before: np.ndarray
    w_after: np.ndarray
    grad: np.ndarray
    output: np.ndarray
    grad_output: np.ndarray

    @property
    def delta(self) -> np.ndarray:
        return self.w_after - self.w_before


def _count(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask))


def _param_reductions(layers: list[Layer]) -> Reductions:
    """``param``/``epoch`` reductions: elements, sums of W^2, g^2, |d|, d^2, max |d|, and
    of g * (W_before - W_after)."""
    rows = [
        {
            "n": float(x.w_before.size),
            "w_sq": np.sum(np.square(x.w_before)),
            "g_sq": np.sum(np.square(x.grad)),
            "g_nonfinite": _count(~np.isfinite(x.grad)),
            "d_sq": np.sum(np.square(x.delta)),
            "d_abs": np.sum(np.abs(x.delta)),
            "d_max": np.max(np.abs(x.delta)),
            "g_dot_d": np.sum(x.grad * (x.w_before - x.w_after)),
        }
        for x in layers
    ]
    return {k: np.array([row[k] for row in rows], np.float64) for k in rows[0]}


def _activation_reductions(layers: list[Layer]) -> Reductions:
    """``activation`` reductions: elements, sum, sum of squares, nonzero, non-finite."""
    out = [x.output for x in layers]
    return {
        "n": np.array([float(o.size) for o in out]),
        "sum": np.array([np.sum(o) for o in out]),
        "sum_sq": np.array([np.sum(np.square(o)) for o in out]),
        "nonzero": np.array([_count(o != 0) for o in out]),  # NaN != 0: NaN counts as nonzero
        "nonfinite": np.array([_count(~np.isfinite(o)) for o in out]),
    }


def _grad_output_reductions(layers: list[Layer]) -> Reductions:
    """``grad_output`` reductions: elements and sum of squares of dL/d output."""
    go = [x.grad_output for x in layers]
    return {
        "n": np.array([float(g.size) for g in go]),
        "sum_sq": np.array([np.sum(np.square(g)) for g in go]),
    }


def _sq(x: np.ndarray) -> float:
    return float(np.sum(np.square(x)))


def _skip_reductions(layers: list[Layer]) -> Reductions:
    """``skip`` reductions, taking the gradient through a block's shortcut (and a long skip)
    to be ``grad_output`` and through its branch (and the path below) to be ``grad``."""
    measured = np.array([float(x.grad_output.size > 0) for x in layers])
    short_sq = np.array([_sq(x.grad_output) for x in layers])
    other_sq = np.array([_sq(x.grad) for x in layers])
    return {
        "shortcut_sq": short_sq, "branch_sq": other_sq, "blocks": measured,
        "long_sq": short_sq, "below_sq": other_sq, "long_skips": measured,
    }  # fmt: skip


def _share_reference(x: Layer) -> float:
    return _ratio(_norm(x.grad_output), _norm(x.grad_output) + _norm(x.grad))


REDUCTIONS: dict[str, Callable[[list[Layer]], Reductions]] = {
    "skip": _skip_reductions,
    "param": _param_reductions,
    "epoch": _param_reductions,
    "activation": _activation_reductions,
    "grad_output": _grad_output_reductions,
}


def _norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.ravel()))


def _ratio(a: float, b: float) -> float:
    return float(np.float64(a) / np.float64(b))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b); NaN where either is 0."""
    norms = _norm(a) * _norm(b)
    return float(np.dot(a.ravel(), b.ravel()) / norms) if norms else math.nan


def _update_references(probe: str) -> dict[str, Callable[[Layer], float]]:
    return {
        f"{probe}/update_norm": lambda x: _norm(x.delta),
        f"{probe}/update_ratio": lambda x: _ratio(_norm(x.delta), _norm(x.w_before)),
        f"{probe}/update_abs_mean": lambda x: float(np.mean(np.abs(x.delta))),
        f"{probe}/update_abs_max": lambda x: float(np.abs(x.delta).max()),
    }


# One independent reference per registered statistic, by key: a statistic registered
# without one here fails test_every_statistic_has_a_reference.
REFERENCES: dict[str, Callable[[Layer], float]] = {
    **_update_references("param"),
    "param/weight_norm": lambda x: _norm(x.w_before),
    "param/grad_norm": lambda x: _norm(x.grad),
    "param/grad_update_cos": lambda x: _cosine(x.grad, x.delta),
    "param/grad_nonfinite": lambda x: _count(~np.isfinite(x.grad)),
    **_update_references("epoch"),
    "activation/mean": lambda x: float(np.mean(x.output)),
    "activation/std": lambda x: float(np.std(x.output, ddof=0)),
    "activation/zero_fraction": lambda x: float(np.mean(x.output == 0)),
    "activation/nonfinite": lambda x: _count(~np.isfinite(x.output)),
    "grad_output/norm": lambda x: _norm(x.grad_output),
    "grad_output/rms": lambda x: float(np.sqrt(np.mean(np.square(x.grad_output)))),
    "skip/shortcut_norm": lambda x: _norm(x.grad_output),
    "skip/branch_norm": lambda x: _norm(x.grad),
    "skip/shortcut_share": _share_reference,
    "skip/long_norm": lambda x: _norm(x.grad_output),
    "skip/below_norm": lambda x: _norm(x.grad),
    "skip/long_share": _share_reference,
}


@contextmanager
def _quiet() -> Iterator[None]:
    """numpy's own warnings (mean of an empty array, inf - inf), outside the code under test."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def reductions(probe: str, layers: list[Layer]) -> Reductions:
    with _quiet():
        return REDUCTIONS[probe](layers)


def reference(key: str, layers: list[Layer]) -> np.ndarray:
    with _quiet():
        return np.array([REFERENCES[key](x) for x in layers], np.float64)


def _layer(rng: np.random.Generator, shape: tuple[int, ...], out: int, relu: bool) -> Layer:
    w = rng.standard_normal(shape) * rng.uniform(0.01, 1.0)
    output = rng.standard_normal(out) * rng.uniform(0.1, 3.0) + rng.uniform(-1.0, 1.0)
    return Layer(
        w_before=w,
        w_after=w - 1e-3 * rng.standard_normal(shape),
        grad=rng.standard_normal(shape) * 1e-2,
        output=np.maximum(output, 0.0) if relu else output,
        grad_output=rng.standard_normal(out) * 1e-3,
    )


def random_layers(seed: int = 0) -> list[Layer]:
    """Five layers of mixed shapes and scales, two with ReLU outputs (exact zeros)."""
    rng = np.random.default_rng(seed)
    specs = [((8, 3, 3, 3), 512, True), ((8,), 64, False), ((16, 8, 3, 3), 4096, True)]
    specs += [((1, 16, 1, 1), 256, False), ((5, 7), 35, False)]
    return [_layer(rng, shape, out, relu) for shape, out, relu in specs]


def nonfinite_layers() -> list[Layer]:
    """NaN and Inf in gradients, outputs, output gradients and updated weights."""
    a, b, c, d, e = random_layers(seed=1)
    a.grad.flat[[0, 5]] = [np.inf, -np.inf]
    a.output[[1, 2]] = np.nan
    b.grad.flat[3] = np.nan
    b.output[0] = np.inf  # mean inf, std NaN (inf - inf)
    b.grad_output[3] = np.nan
    c.w_after.flat[7] = np.inf  # update inf
    c.output[[4, 5]] = [np.inf, -np.inf]  # mean NaN
    d.w_after.flat[0] = np.nan  # update NaN, its max too
    d.grad_output[0] = -np.inf
    e.grad[:] = np.nan
    return [a, b, c, d, e]


def zero_layers() -> list[Layer]:
    """Zero weights and no update (0/0), zero weights with an update (x/0), all-zero
    outputs and output gradients, and one ordinary layer."""
    rng = np.random.default_rng(2)
    zero = np.zeros((4, 3))
    ordinary = _layer(rng, (4, 3), 12, relu=False)
    return [
        Layer(zero, zero.copy(), zero.copy(), np.zeros(12), np.zeros(12)),
        Layer(zero, zero + 1e-3, zero.copy(), np.zeros(12), np.zeros(12)),
        Layer(zero, np.full((4, 3), -2e-3), rng.normal(size=(4, 3)), np.zeros(12), np.zeros(12)),
        ordinary,
    ]


CASES: dict[str, Callable[[], list[Layer]]] = {
    "random": random_layers,
    "nonfinite": nonfinite_layers,
    "zeros": zero_layers,
}


def test_every_statistic_has_a_reference() -> None:
    assert set(REFERENCES) == set(STATISTICS)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("key", list(STATISTICS))
def test_statistic_matches_numpy_on_the_raw_arrays(key: str, case: str) -> None:
    stat = STATISTICS.get(key)
    layers = CASES[case]()
    got = statistics.compute(stat.probe, reductions(stat.probe, layers))[stat.name]
    want = reference(key, layers)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0, equal_nan=True, err_msg=key)


def _stats(probe: str, layers: list[Layer]) -> dict[str, np.ndarray]:
    return statistics.compute(probe, reductions(probe, layers))


def test_nonfinite_entries_are_counted_and_poison_only_their_statistics() -> None:
    layers = nonfinite_layers()
    param, act, gout = (_stats(p, layers) for p in ("param", "activation", "grad_output"))
    n_grad = layers[4].grad.size
    np.testing.assert_array_equal(param["grad_nonfinite"], [2, 1, 0, 0, n_grad])
    np.testing.assert_array_equal(param["grad_norm"][[0, 1, 4]], [np.inf, np.nan, np.nan])
    np.testing.assert_array_equal(param["update_norm"][[2, 3]], [np.inf, np.nan])
    np.testing.assert_array_equal(param["update_abs_max"][[2, 3]], [np.inf, np.nan])
    np.testing.assert_array_equal(act["nonfinite"], [2, 1, 2, 0, 0])
    np.testing.assert_array_equal(act["mean"][:3], [np.nan, np.inf, np.nan])
    assert np.isnan(act["std"][:3]).all()  # a layer with NaN or Inf has no std
    assert np.isfinite(act["std"][3:]).all() and np.isfinite(act["zero_fraction"]).all()
    np.testing.assert_array_equal(gout["norm"][[1, 3]], [np.nan, np.inf])
    assert np.isfinite(np.delete(gout["rms"], [1, 3])).all()


@pytest.mark.parametrize("probe", PROBES)
def test_a_layer_without_data_has_nan_statistics(probe: str) -> None:
    empty = {k: v.copy() for k, v in reductions(probe, random_layers()).items()}
    for v in empty.values():
        v[2] = np.nan
    got = statistics.compute(probe, empty)
    for name, values in got.items():
        assert np.isnan(values[2]), name
        assert np.isfinite(np.delete(values, 2)).all(), name


@pytest.mark.parametrize("probe", ["activation", "grad_output"])
def test_a_layer_with_empty_output_matches_numpy_on_an_empty_array(probe: str) -> None:
    empty = np.empty(0)
    layers = [*random_layers()[:2], Layer(empty, empty, empty, empty, empty)]
    got = _stats(probe, layers)
    for name, values in got.items():
        want = reference(f"{probe}/{name}", layers)
        np.testing.assert_allclose(values, want, rtol=RTOL, equal_nan=True, err_msg=name)
    assert np.isnan(got["mean" if probe == "activation" else "rms"][2])


def test_zero_weights_give_nan_or_inf_update_ratio() -> None:
    ratio = _stats("param", zero_layers())["update_ratio"]
    assert np.isnan(ratio[0])  # 0 / 0
    np.testing.assert_array_equal(ratio[1:3], [np.inf, np.inf])  # x / 0
    assert np.isfinite(ratio[3]) and ratio[3] > 0


def test_std_far_from_zero_keeps_eight_digits() -> None:
    rng = np.random.default_rng(3)
    out = 1e3 + rng.standard_normal((3, 10_000)) * np.array([[1.0], [0.5], [2.0]])
    layers = [Layer(*(np.zeros(1),) * 3, o, np.zeros(1)) for o in out]
    got = _stats("activation", layers)
    np.testing.assert_allclose(got["mean"], out.mean(axis=1), rtol=RTOL)
    np.testing.assert_allclose(got["std"], out.std(axis=1), rtol=RTOL_OFFSET)


def test_std_of_a_constant_layer_is_zero_when_rounding_makes_the_variance_negative() -> None:
    out = np.full(100, 1000.1)
    (n, total, sum_sq) = (out.size, np.sum(out), np.sum(np.square(out)))
    assert sum_sq / n - (total / n) ** 2 < 0  # the case this test is about
    std = _stats("activation", [Layer(*(np.zeros(1),) * 3, out, np.zeros(1))])["std"]
    np.testing.assert_array_equal(std, [0.0])


@pytest.mark.parametrize("probe", PROBES)
def test_compute_returns_names_in_registration_order_as_float64(probe: str) -> None:
    registered = [s.name for s in map(STATISTICS.get, STATISTICS) if s.probe == probe]
    assert registered
    assert statistics.names(probe) == registered
    layers = random_layers()
    got = _stats(probe, layers)
    assert list(got) == registered
    for values in got.values():
        assert values.dtype == np.float64 and values.shape == (len(layers),)


@pytest.mark.parametrize("probe", PROBES)
def test_compute_is_elementwise_over_steps_and_layers(probe: str) -> None:
    steps = [reductions(probe, random_layers(seed)) for seed in range(3)]
    stacked = {k: np.stack([r[k] for r in steps]) for k in steps[0]}
    got = statistics.compute(probe, stacked)
    for name, values in got.items():
        want = np.stack([statistics.compute(probe, r)[name] for r in steps])
        np.testing.assert_array_equal(values, want, err_msg=name)


def test_a_new_statistic_comes_last_in_its_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh: Registry[statistics.Statistic] = Registry("statistic")
    for key in STATISTICS:
        fresh.register(key)(STATISTICS.get(key))
    monkeypatch.setattr(statistics, "STATISTICS", fresh)
    before = statistics.names("param")
    statistics.statistic("param", "w_sq", "sum of W^2")(lambda r: r["w_sq"])
    assert statistics.names("param") == [*before, "w_sq"]
    param = reductions("param", random_layers())
    got = statistics.compute("param", param)
    assert list(got)[-1] == "w_sq"
    np.testing.assert_array_equal(got["w_sq"], param["w_sq"])
    with pytest.raises(ValueError, match="registered twice"):
        statistics.statistic("param", "w_sq", "again")(lambda r: r["w_sq"])


@pytest.mark.parametrize("probe", ["nope", "activ", "", "param/"])
def test_unknown_probe_has_no_statistics(probe: str) -> None:
    assert statistics.names(probe) == []
    assert statistics.compute(probe, {}) == {}


def test_each_statistic_is_described_in_one_line() -> None:
    for key in STATISTICS:
        stat = STATISTICS.get(key)
        assert stat.key == key == f"{stat.probe}/{stat.name}"
        assert stat.probe in PROBES
        assert stat.doc.strip() and "\n" not in stat.doc
