"""The writer thread driven directly: hand-packed rows in, run file statistics out.

Each step's packed vector is built from raw float64 arrays (weights before and after the
step, gradients, layer outputs, output gradients) reduced by the test itself; the run
file's statistics are compared with numpy statistics of the same raw arrays per layer.
Statistics are stored as float32: rtol 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from gradflow import open_run
from gradflow.probes import Block, LayerMap
from gradflow.runfile import Layer, Run
from gradflow.writer import EpochItem, Relayout, RunLayout, StepItem, WriterThread

RTOL = 1e-6
NAMES = ["enc", "mid", "dec"]  # columns of the run file (forward order)
REG_TO_LAYER = np.array([2, 0, 1])  # registration order: dec, enc, mid
REG_OF = {int(col): reg for reg, col in enumerate(REG_TO_LAYER)}
SIZES = [[12, 3], [8], [6, 2]]  # parameter tensors of each layer, in forward order
RESIZED = [[12, 3], [6, 4], [6, 2]]  # after a re-derivation: mid has two tensors


def _map(sizes: Sequence[Sequence[int]]) -> LayerMap:
    counts = [len(s) for s in sizes]
    return LayerMap(
        n_layers=len(sizes),
        reg_to_layer=REG_TO_LAYER,
        layer_starts=np.array([0, *np.cumsum(counts)[:-1]], np.int64),
        layer_numel=np.array([sum(s) for s in sizes], np.float64),
    )


def _layout(path: Path) -> RunLayout:
    layers = [
        Layer(index=i, name=name, kind="linear", type="Linear", depth=i, n_params=sum(s), shape="")
        for i, (name, s) in enumerate(zip(NAMES, SIZES, strict=True))
    ]
    return RunLayout(
        path=path,
        layers=layers,
        probes=("param", "activation", "grad_output"),
        map=_map(SIZES),
        config={"model": "hand-packed"},
        attrs={"device": "cpu"},
        overwrite=False,
    )


# -- raw arrays and their reductions -------------------------------------------------------
@dataclass
class Raw:
    """Per layer (forward column): the raw arrays a step's statistics come from."""

    w: dict[int, list[np.ndarray]] = field(default_factory=dict)
    g: dict[int, list[np.ndarray]] = field(default_factory=dict)
    d: dict[int, list[np.ndarray]] = field(default_factory=dict)
    act: dict[int, list[np.ndarray]] = field(default_factory=dict)
    gout: dict[int, list[np.ndarray]] = field(default_factory=dict)


def _param_block(rng: np.random.Generator, sizes: Sequence[Sequence[int]], raw: Raw) -> np.ndarray:
    """Per-tensor columns [w_sq x P, g_sq x P, g_nonfinite x P, d_sq x P, d_abs x P,
    g_dot_d x P, d_max x P] of random weights, gradients and updates ``d`` (the kernels'
    ``g_dot_d`` is taken with ``W_before - W_after``, the negated update)."""
    cols: list[list[float]] = [[] for _ in range(7)]
    for layer, tensor_sizes in enumerate(sizes):
        for size in tensor_sizes:
            w = rng.normal(size=size)
            g = rng.normal(scale=0.1, size=size)
            d = rng.normal(scale=1e-3, size=size)
            for part, values in ((raw.w, w), (raw.g, g), (raw.d, d)):
                part.setdefault(layer, []).append(values)
            columns = [
                (w * w).sum(),
                (g * g).sum(),
                float((~np.isfinite(g)).sum()),
                (d * d).sum(),
                np.abs(d).sum(),
                -(g * d).sum(),
                np.abs(d).max(),
            ]
            for col, value in zip(cols, columns, strict=True):
                col.append(value)
    return np.concatenate(cols)


def _calls(
    rng: np.random.Generator,
    layers: Sequence[int],
    width: int,
    store: dict[int, list[np.ndarray]],
    offset: float = 0.5,
) -> tuple[np.ndarray, Block]:
    """One call per entry of ``layers`` (columns); each call's output is random with exact
    zeros. Returns the calls' columns (all four, or sum_sq alone) and their block."""
    values, counts = [], []
    for layer in layers:
        a = np.maximum(rng.normal(loc=offset, size=int(rng.integers(5, 20))), 0.0)
        store.setdefault(layer, []).append(a)
        four = [a.sum(), (a * a).sum(), float(np.count_nonzero(a)), float((~np.isfinite(a)).sum())]
        values += four if width == 4 else [four[1]]
        counts.append(a.size)
    ids = tuple(REG_OF[layer] for layer in layers)
    return np.array(values, np.float64), Block(len(values), ids, tuple(counts))


@dataclass
class Step:
    """A hand-packed step and what it was packed from."""

    item: StepItem
    raw: Raw


def _step(
    rng: np.random.Generator,
    step: int,
    *,
    act: Sequence[int] | None = (0, 1, 2),
    gout: Sequence[int] | None = (2, 1, 0),
    param: bool = True,
    sizes: Sequence[Sequence[int]] = SIZES,
    device_scalars: dict[str, float] | None = None,
    host_scalars: dict[str, float] | None = None,
) -> Step:
    """``act``/``gout``: the layers (columns) called, in call order (None: the probe
    measured nothing); ``device_scalars`` packed after the blocks (default: the loss)."""
    raw = Raw()
    parts: list[np.ndarray] = []
    blocks: dict[str, Block] = {}
    if param:
        vec = _param_block(rng, sizes, raw)
        parts.append(vec)
        blocks["param"] = Block(vec.size)
    if act is not None:
        vec, blocks["activation"] = _calls(rng, act, 4, raw.act)
        parts.append(vec)
    if gout is not None:
        vec, blocks["grad_output"] = _calls(rng, gout, 1, raw.gout, offset=0.0)
        parts.append(vec)
    device_scalars = {"loss": 1.0 / (step + 1)} if device_scalars is None else device_scalars
    parts.append(np.array(list(device_scalars.values()), np.float64))
    packed = np.concatenate(parts)
    item = StepItem(
        step=step,
        epoch=step // 10,
        time=0.5 * step,
        packed=torch.from_numpy(packed),
        ready=None,
        blocks=blocks,
        scalar_names=list(device_scalars),
        host_scalars=dict(host_scalars or {}),
        skipped=step % 2 == 1,
        overhead=[1e-4, 2e-4, 3e-4],
    )
    return Step(item, raw)


def _offset(blocks: dict[str, Block], probe: str) -> int:
    pos = 0
    for name, block in blocks.items():
        if name == probe:
            return pos
        pos += block.size
    raise KeyError(probe)


# -- numpy statistics of the raw arrays -------------------------------------------------------
def _per_layer(
    parts: dict[int, list[np.ndarray]], fn: Callable[[np.ndarray], float], n_layers: int = 3
) -> np.ndarray:
    """``fn`` of each layer's arrays together (NaN for a layer without any)."""
    return np.array(
        [fn(np.concatenate(parts[k])) if k in parts else math.nan for k in range(n_layers)]
    )


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt((a * a).sum()))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (_norm(a) * _norm(b)))


def _expected(raw: Raw, scale: float = 1.0) -> dict[tuple[str, str], np.ndarray]:
    out: dict[tuple[str, str], np.ndarray] = {}
    if raw.w:
        d = raw.d
        out |= {
            ("param", "weight_norm"): _per_layer(raw.w, _norm),
            ("param", "grad_norm"): _per_layer(raw.g, _norm),
            ("param", "grad_nonfinite"): _per_layer(raw.g, lambda a: (~np.isfinite(a)).sum()),
            ("param", "update_norm"): _per_layer(d, _norm),
            ("param", "update_ratio"): _per_layer(d, _norm) / _per_layer(raw.w, _norm),
            ("param", "update_abs_mean"): _per_layer(d, lambda a: np.abs(a).mean()),
            ("param", "update_abs_max"): _per_layer(d, lambda a: np.abs(a).max()),
            ("param", "grad_update_cos"): np.array(
                [
                    _cosine(np.concatenate(raw.g[k]), np.concatenate(d[k])) if k in d else math.nan
                    for k in range(3)
                ]
            ),
        }
    out |= {
        ("activation", "mean"): _per_layer(raw.act, np.mean),
        ("activation", "std"): _per_layer(raw.act, np.std),
        ("activation", "zero_fraction"): _per_layer(raw.act, lambda a: (a == 0).mean()),
        ("activation", "nonfinite"): _per_layer(raw.act, lambda a: (~np.isfinite(a)).sum()),
        ("grad_output", "norm"): _per_layer(raw.gout, _norm) / scale,
        ("grad_output", "rms"): _per_layer(raw.gout, lambda a: np.sqrt((a * a).mean())) / scale,
    }
    return out


def _write(path: Path, items: Sequence[object]) -> WriterThread:
    """Write ``items`` after the layout; every row is committed at the end (or at a
    Relayout)."""
    writer = WriterThread(flush_every=1000, flush_seconds=600.0)
    writer.start()
    writer.put(_layout(path))
    for item in items:
        writer.put(item)
    writer.finish(timeout=60)
    assert not writer.is_alive()
    assert writer.error is None, writer.error
    return writer


def _check_rows(
    run: Run, rows: Sequence[int], steps: Sequence[Step], scales: Sequence[float] | None = None
) -> None:
    """The run file's rows against numpy statistics of the steps' raw arrays (output
    gradients divided by ``scales``)."""
    for row, step, s in zip(rows, steps, scales or [1.0] * len(steps), strict=True):
        want = _expected(step.raw, s)
        if not step.raw.w:
            for name in run.probes()["param"]:
                assert np.isnan(run.stat("param", name)[row]).all(), name
        for (probe, name), values in want.items():
            got = run.stat(probe, name)[row].astype(np.float64)
            np.testing.assert_allclose(got, values, rtol=RTOL, err_msg=f"row {row} {probe}/{name}")


# -- statistics ------------------------------------------------------------------------------
def test_rows_epochs_and_relayout_against_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # One commit of rows with different call patterns: every layer once; the same sizes
    # in another call order; mid (forward column 1) twice and the calls out of order; mid
    # never called and no output gradients measured; no parameter row; the first again.
    before = [
        _step(rng, 0),
        _step(rng, 1, act=(2, 0, 1), gout=(0, 1, 2)),
        _step(rng, 2, act=(2, 1, 0, 1), gout=(1, 2, 1, 0, 0)),
        _step(rng, 3, act=(0, 2), gout=None),
        _step(rng, 4, param=False),
        _step(rng, 5, host_scalars={"lr": 0.1}),
    ]
    after = [
        _step(rng, 6, sizes=RESIZED),
        _step(rng, 7, sizes=RESIZED, act=(1, 1)),
    ]
    epoch_raw = Raw()
    epoch_vec = _param_block(rng, RESIZED, epoch_raw)
    epoch = EpochItem(
        epoch=0,
        end_step=8,
        time=4.0,
        packed=torch.from_numpy(np.concatenate([epoch_vec, [0.25]])),
        ready=None,
        metric_names=["val_loss"],
        host_metrics={"v_rand": 0.125},
        probe="param",
        block=Block(epoch_vec.size),
    )
    no_update = EpochItem(1, 10, 5.0, torch.tensor([0.5]), None, ["val_loss"], {}, "param", None)
    path = tmp_path / "run.h5"
    relayout = Relayout(_map(RESIZED))
    items = [*(s.item for s in before), relayout, *(s.item for s in after), epoch, no_update]
    writer = _write(path, items)
    assert writer.rows_written == 8 and writer.first_nonfinite is None
    with open_run(path) as run:
        assert run.layer_names == NAMES
        assert run.n_steps == 8
        np.testing.assert_array_equal(run.steps, np.arange(8))
        np.testing.assert_array_equal(run.skipped, [0, 1, 0, 1, 0, 1, 0, 1])
        np.testing.assert_allclose(run.loss, [1 / (s + 1) for s in range(8)], rtol=RTOL)
        lr = run.scalars["lr"]
        assert lr[5] == pytest.approx(0.1) and np.isnan(np.delete(lr, 5)).all()
        _check_rows(run, range(8), [*before, *after])
        # Spot checks of the patterns themselves.
        assert np.isnan(run.stat("activation", "mean")[3, 1])
        assert np.isnan(run.stat("grad_output", "norm")[3]).all()
        # Epochs: the per-tensor updates over the epoch, unpacked with the map in force.
        assert run.n_epochs == 2
        np.testing.assert_array_equal(run.epoch_end_step, [8, 10])
        np.testing.assert_allclose(run.metrics["val_loss"], [0.25, 0.5])
        assert run.metrics["v_rand"][0] == 0.125 and np.isnan(run.metrics["v_rand"][1])
        want = _expected(epoch_raw)
        for name in ("update_abs_mean", "update_ratio", "update_norm", "update_abs_max"):
            got = run.stat("epoch", name).astype(np.float64)
            np.testing.assert_allclose(got[0], want[("param", name)], rtol=RTOL, err_msg=name)
            assert np.isnan(got[1]).all()


@pytest.mark.parametrize("where", ["host", "device"])
def test_loss_scale_divides_output_gradients_only(tmp_path: Path, where: str) -> None:
    rng = np.random.default_rng(2)
    scales = [1024.0, 0.125, math.inf, 0.0]  # the last two: not a usable scale, not divided
    steps = []
    for i, scale in enumerate(scales):
        if where == "host":
            steps.append(
                _step(rng, i, device_scalars={}, host_scalars={"loss": 0.5, "scale": scale})
            )
        else:
            steps.append(_step(rng, i, device_scalars={"loss": 0.5, "scale": scale}))
    path = tmp_path / "scaled.h5"
    _write(path, [s.item for s in steps])
    divisors = [1024.0, 0.125, 1.0, 1.0]
    with open_run(path) as run:
        np.testing.assert_array_equal(run.scale, np.array(scales, np.float32))
        assert "scale" not in run.scalars
        # grad_output divided by the scale (its sum of squares by scale**2); parameter
        # gradients and activations as they were packed.
        _check_rows(run, range(4), steps, scales=divisors)


# -- the first non-finite value -------------------------------------------------------------
# Entries of the first non-finite value's columns in each probe's block, by forward column
# (with _step's default call orders). A non-finite value makes its sums non-finite too.
P = sum(len(s) for s in SIZES)
FIRST_TENSOR = {0: 0, 1: 2, 2: 3}  # column -> index of its first parameter tensor
OUTPUT_CALL = {0: 0, 1: 1, 2: 2}  # activation calls in column order 0, 1, 2
GRAD_OUTPUT_CALL = {0: 2, 1: 1, 2: 0}  # output-gradient calls in column order 2, 1, 0


def _edits(blocks: dict[str, Block], loss_at: int) -> dict[str, list[tuple[int, float]]]:
    param, act, gout = (_offset(blocks, name) for name in ("param", "activation", "grad_output"))
    return {
        # weights of columns 1 and 2: forward, the first bad column is reported
        "weight": [(param + FIRST_TENSOR[c], v) for c, v in ((1, math.inf), (2, math.nan))],
        # outputs of columns 0 and 2: sum NaN, one non-finite entry
        "output": [
            (act + 4 * OUTPUT_CALL[c] + j, v) for c in (0, 2) for j, v in ((0, math.nan), (3, 1.0))
        ],
        # output gradients of columns 0 and 1: backward, the last bad column is reported
        "grad_output": [(gout + GRAD_OUTPUT_CALL[c], math.inf) for c in (0, 1)],
        # gradients of columns 0 and 1: sum of squares NaN, four non-finite entries
        "gradient": [
            (param + k * P + FIRST_TENSOR[c], v)
            for c in (0, 1)
            for k, v in ((1, math.nan), (2, 4.0))
        ],
        "loss": [(loss_at, math.inf)],
    }


@pytest.mark.parametrize(
    ("bad", "probe", "layer", "what"),
    [
        (("weight", "output", "grad_output", "gradient"), "param", "mid", "weight"),
        (("output", "grad_output", "gradient"), "activation", "enc", "output"),
        (("grad_output", "gradient"), "grad_output", "mid", "output gradient"),
        (("gradient",), "param", "mid", "gradient"),
        (("loss",), "loss", "", "loss is inf"),
    ],
)
def test_first_nonfinite_in_step_order(
    tmp_path: Path, bad: tuple[str, ...], probe: str, layer: str, what: str
) -> None:
    rng = np.random.default_rng(3)
    clean = _step(rng, 0)
    step = _step(rng, 1)
    second = _step(rng, 2)
    packed = step.item.packed.numpy()
    edits = _edits(step.item.blocks, loss_at=packed.size - 1)
    for kind in bad:
        for index, value in edits[kind]:
            packed[index] = value
    # A later step that is bad everywhere is not the first.
    later = second.item.packed.numpy()
    later[:] = math.nan
    path = tmp_path / "bad.h5"
    writer = _write(path, [clean.item, step.item, second.item])
    with open_run(path) as run:
        events = [e for e in run.events if e.kind == "nonfinite"]
        assert len(events) == 1
        event = run.first_nonfinite
    assert event == writer.first_nonfinite
    assert event is not None
    assert (event.step, event.probe, event.layer) == (1, probe, layer)
    if probe != "loss":
        assert event.detail == f"non-finite {what} in 2 layer(s), first at {layer}"
    else:
        assert event.detail == what
