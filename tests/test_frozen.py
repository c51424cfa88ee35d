"""Layers that are frozen, unfrozen and frozen again: what the recorder measures (against a
float64 reference that uses no gradflow code, to 1e-5 relative) and what it costs, and
what the figures and the report leave out (layers never measured in the drawn range)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from test_stacks import RTOL, batches
from torch import nn

import gradflow
from gradflow import Recorder, open_run
from gradflow.plots import TimeWindow, depth_profile, diff_heatmap, gradient_heatmap
from gradflow.recorder.hooks import Hook
from gradflow.report import payload

NAMES = ["0", "2", "4", "6"]
STEPS = 8
# Layer "0" stays frozen; "2" is frozen at construction, unfrozen for steps 2-4, frozen for
# 5-6 and unfrozen again at 7; "4" and "6" train throughout.
UNFROZEN = {"0": set(), "2": {2, 3, 4, 7}, "4": set(range(STEPS)), "6": set(range(STEPS))}
PARAM = ("weight_norm", "grad_norm", "grad_nonfinite", "update_norm", "update_ratio",
         "update_abs_mean", "update_abs_max")  # fmt: skip
ACTIVATION = ("mean", "std", "zero_fraction", "nonfinite")
GRAD_OUTPUT = ("norm", "rms")


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(),
        nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3),
    )  # fmt: skip


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def reference_row(
    layers: dict[str, nn.Module],
    before: dict[str, tuple[torch.Tensor, torch.Tensor]],
    outputs: dict[str, torch.Tensor],
) -> dict[str, np.ndarray]:
    """The statistics of one step in float64; NaN for a layer frozen at it."""
    row: dict[str, list[float]] = {}
    for name, module in layers.items():
        values = dict.fromkeys([f"param/{s}" for s in PARAM], np.nan)
        values.update(dict.fromkeys([f"activation/{s}" for s in ACTIVATION], np.nan))
        values.update(dict.fromkeys([f"grad_output/{s}" for s in GRAD_OUTPUT], np.nan))
        if name in before:
            w, g = before[name]
            d = flat(list(module.parameters())) - w
            out = outputs[name].detach().double()
            gout = outputs[name].grad.double()
            values.update({
                "param/weight_norm": float(w.norm()),
                "param/grad_norm": float(g.norm()),
                "param/grad_nonfinite": float((~torch.isfinite(g)).sum()),
                "param/update_norm": float(d.norm()),
                "param/update_ratio": float(d.norm() / w.norm()),
                "param/update_abs_mean": float(d.abs().mean()),
                "param/update_abs_max": float(d.abs().max()),
                "activation/mean": float(out.mean()),
                "activation/std": float(out.std(unbiased=False)),
                "activation/zero_fraction": float((out == 0).double().mean()),
                "activation/nonfinite": float((~torch.isfinite(out)).sum()),
                "grad_output/norm": float(gout.norm()),
                "grad_output/rms": float(gout.square().mean().sqrt()),
            })  # fmt: skip
        for key, value in values.items():
            row.setdefault(key, []).append(value)
    return {key: np.array(v) for key, v in row.items()}


def note(fig: Figure) -> str:
    """The note under a figure, on one line."""
    return fig.legends[0].get_title().get_text().replace("\n", " ") if fig.legends else ""


def recorder_hooked(module: nn.Module) -> bool:
    return any(isinstance(h, Hook) for h in module._forward_hooks.values())


def record(path: Path, *, unfrozen: dict[str, set[int]] = UNFROZEN, **options: Any) -> list:
    """Train ``model()`` for :data:`STEPS` steps freezing and unfreezing its layers as
    ``unfrozen`` says, recording into ``path``; returns the reference rows."""
    net = model()
    layers = {name: net[int(name)] for name in NAMES}
    for name, module in layers.items():
        module.requires_grad_(0 in unfrozen[name])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.retain_grad()
            outputs[name] = out

        return hook

    for name, module in layers.items():
        module.register_forward_hook(keep(name))
    rows = []
    with Recorder(net, opt, path, **options) as rec:
        assert rec.layer_names == NAMES  # frozen or not, every layer owning parameters
        for step, (x, y) in enumerate(batches(STEPS)):
            for name, module in layers.items():
                module.requires_grad_(step in unfrozen[name])
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            # What costs nothing: no forward hook and no snapshot of a frozen layer.
            measured = [
                p for name in NAMES if step in unfrozen[name] for p in layers[name].parameters()
            ]
            snapshot = rec._step_probes[0].reductions.params
            assert [id(p) for p in snapshot] == [id(p) for p in measured]
            for name, module in layers.items():
                assert recorder_hooked(module) == (step in unfrozen[name]), (step, name)
            before = {
                name: (flat(list(module.parameters())), flat([p.grad for p in module.parameters()]))
                for name, module in layers.items()
                if step in unfrozen[name]
            }
            opt.step()
            rows.append(reference_row(layers, before, outputs))
    return rows


def test_unfrozen_refrozen_and_unfrozen_again_statistics_equal_the_reference(tmp_path) -> None:
    path = tmp_path / "r.h5"
    rows = record(path)
    with open_run(path) as run:
        assert run.layer_names == NAMES and run.n_steps == STEPS
        for key in rows[0]:
            probe, stat = key.split("/")
            want = np.stack([r[key] for r in rows])
            got = run.stat(probe, stat).astype(np.float64)
            rtol = 1e-4 if stat == "std" else RTOL
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7, err_msg=key)
        # The reference's NaNs are where the schedule says a layer was frozen.
        grad = run.stat("param", "grad_norm")
        for k, name in enumerate(NAMES):
            assert set(np.flatnonzero(np.isfinite(grad[:, k]))) == UNFROZEN[name]


def test_layers_chooses_frozen_layers_too(tmp_path) -> None:
    path = tmp_path / "r.h5"
    net = model()
    net[2].requires_grad_(False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with Recorder(net, opt, path, layers=["2", "4"]) as rec:
        assert rec.layer_names == ["2", "4"]
        for step, (x, y) in enumerate(batches(3)):
            net[2].requires_grad_(step == 2)
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    with open_run(path) as run:
        grad = run.stat("param", "grad_norm")
        assert np.isnan(grad[:2, 0]).all() and np.isfinite(grad[2]).all()


def bounds(window: TimeWindow) -> tuple[int, int]:
    """The steps [lo, hi) of ``window`` in a run of STEPS steps."""
    return window.start or 0, window.stop or STEPS


def left_out_note(n: int) -> str:
    """The line under a figure that leaves out ``n`` layers never measured."""
    layers, are = ("layers", "are") if n > 1 else ("layer", "is")
    return f"{n} {layers} never measured in this range {are} not drawn"


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("frozen") / "frozen.h5"
    record(path)
    return path


@pytest.mark.parametrize(
    ("steps", "drawn"),
    [(None, ["2", "4", "6"]), (TimeWindow("step", 0, 2), ["4", "6"]),
     (TimeWindow("step", 5, 7), ["4", "6"]), (TimeWindow("step", 4, 6), ["2", "4", "6"])],
)  # fmt: skip
def test_heat_maps_leave_out_layers_never_measured_in_the_drawn_range(
    frozen_run: Path, steps: TimeWindow | None, drawn: list[str]
) -> None:
    window = steps or TimeWindow("step")
    lo, hi = bounds(window)
    # The layers unfrozen at some step of the window, from the schedule, not the run file.
    assert [n for n in NAMES if UNFROZEN[n] & set(range(lo, hi))] == drawn
    with open_run(frozen_run) as run:
        fig = gradient_heatmap([run], stat="param/grad_norm", window=steps, all_layers=True)
        values = run.stat("param", "grad_norm")
    mesh = fig.axes[0].collections[0].get_array()
    assert mesh.shape[0] == len(drawn)  # rows: layers, columns: steps
    columns = [NAMES.index(n) for n in drawn]
    np.testing.assert_allclose(np.ma.getdata(mesh).T, values[lo:hi][:, columns], equal_nan=True)
    assert note(fig) == left_out_note(len(NAMES) - len(drawn))


@pytest.mark.parametrize(
    ("steps", "drawn"),
    [(None, ["2", "4", "6"]), (TimeWindow("step", 0, 2), ["4", "6"]),
     (TimeWindow("step", 4, 6), ["2", "4", "6"])],
)  # fmt: skip
def test_depth_profile_leaves_out_layers_never_measured_in_the_drawn_range(
    frozen_run: Path, steps: TimeWindow | None, drawn: list[str]
) -> None:
    window = steps or TimeWindow("step")
    lo, hi = bounds(window)
    with open_run(frozen_run) as run:
        fig = depth_profile([run], stat="param/grad_norm", window=window, all_layers=True)
        values = run.stat("param", "grad_norm").astype(np.float64)
    line = fig.axes[0].get_lines()[0]  # the profile; the stage marks are drawn after it
    x, y = (np.asarray(v, np.float64) for v in line.get_data())
    np.testing.assert_array_equal(x, np.arange(len(drawn)) + 0.5)
    # The window's mean of each drawn layer over the steps that measured it.
    columns = [NAMES.index(n) for n in drawn]
    window_values = values[lo:hi][:, columns]
    measured = np.isfinite(window_values)
    expected = np.where(measured, window_values, 0).sum(0) / measured.sum(0)
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    assert note(fig) == left_out_note(len(NAMES) - len(drawn))


def test_sweep_grid_leaves_out_layers_no_run_of_a_panel_measured(tmp_path: Path) -> None:
    # Two seeds of each of two settings: layer "0" frozen throughout (both), "4" too (second).
    frozen = {"0": UNFROZEN, "0 and 4": {**UNFROZEN, "4": set()}}
    for label, unfrozen in frozen.items():
        for seed in range(2):
            path = tmp_path / f"{label.replace(' ', '-')}-s{seed}.h5"
            record(path, unfrozen=unfrozen, config={"frozen": label, "seed": seed})
    fig = gradflow.sweep(tmp_path, cache=False).heatmap_figure("param/grad_norm")
    heat = {t.hovertemplate.split("<extra>")[1]: t for t in fig.data if t.type == "heatmap"}
    assert sorted(heat) == ["0 (2 runs)</extra>", "0 and 4 (2 runs)</extra>"]
    for label, unfrozen in frozen.items():
        trace = heat[f"{label} (2 runs)</extra>"]
        drawn = [n for n in NAMES if unfrozen[n]]
        assert list(trace.y) == drawn
        stack = []
        for seed in range(2):
            with open_run(tmp_path / f"{label.replace(' ', '-')}-s{seed}.h5") as run:
                stack.append(run.stat("param", "grad_norm").astype(np.float64))
        mean = np.mean(stack, axis=0)  # both seeds freeze alike: NaN at the same cells
        columns = [NAMES.index(n) for n in drawn]
        np.testing.assert_allclose(
            np.asarray(trace.customdata, np.float64), mean[:, columns].T, rtol=1e-6, equal_nan=True
        )
    notes = fig.layout.title.text.split("; ")[1:]
    assert sorted(notes) == [
        "0 and 4: 2 layers never measured in this range are not drawn",
        "0: 1 layer never measured in this range is not drawn",
    ]


def test_diff_heat_map_leaves_out_layers_never_measured_in_either_run(
    frozen_run: Path, tmp_path: Path
) -> None:
    other = tmp_path / "b.h5"
    record(other, unfrozen={**UNFROZEN, "4": set()})  # "4" never measured in B
    with open_run(frozen_run) as a, open_run(other) as b:
        fig = diff_heatmap([a, b], stat="param/grad_norm", window=TimeWindow("step"))
    assert fig.axes[0].collections[0].get_array().shape[0] == 2  # "2" and "6"
    assert note(fig) == "2 layers never measured in this range are not drawn"


def test_report_lists_only_measured_layers_and_counts_the_rest(frozen_run: Path) -> None:
    with open_run(frozen_run) as run:
        data = payload([run])
    (shown,) = data["runs"]
    assert [lay["name"] for lay in shown["layers"]] == ["2", "4", "6"]
    assert shown["not_measured"] == 1
    for section in data["heatmaps"]:
        (panel,) = section["panels"]
        assert [shown["layers"][k]["name"] for k in panel["rows"]] == ["2", "4", "6"]
        assert section["left_out"] == "1 layer never measured in this range is not drawn"


def test_notebook_heat_map_leaves_out_layers_never_measured(frozen_run: Path) -> None:
    fig = gradflow.show(frozen_run, "param/grad_norm")
    (heat,) = fig.data
    assert list(heat.y) == ["2", "4", "6"]
    assert fig.layout.title.text == (
        "param/grad_norm; 1 layer never measured in this range is not drawn"
    )


def test_report_without_optimizer_leaves_out_the_frozen_layer_everywhere(tmp_path) -> None:
    path = tmp_path / "r.h5"
    net = model()
    net[0].requires_grad_(False)
    with Recorder(net, None, path):  # no optimizer: no update anywhere, NaN in every layer
        for x, y in batches(3):
            net.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
    with open_run(path) as run:
        assert np.isnan(run.stat("param", "update_ratio")).all()
        data = payload([run])
    (shown,) = data["runs"]
    assert [lay["name"] for lay in shown["layers"]] == ["2", "4", "6"]
    assert shown["not_measured"] == 1
    ratio = next(s for s in data["heatmaps"] if s["stat"] == "param/update_ratio")
    (panel,) = ratio["panels"]
    assert panel["rows"] == [0, 1, 2]
    assert ratio["left_out"] == "1 layer never measured in this range is not drawn"
