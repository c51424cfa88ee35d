"""Figures draw exactly the data stored in the run file (gradflow.plots)."""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import CenteredNorm, LogNorm
from matplotlib.figure import Figure
from runfiles import SyntheticRun, fcn_layers, write_run
from torch import nn

from gradflow import Recorder
from gradflow.errors import GradflowError
from gradflow.plots import (
    PlotWarning,
    TimeWindow,
    activation_heatmap,
    best_losses,
    best_losses_table,
    binning,
    depth_profile,
    diff_heatmap,
    gradient_heatmap,
    learning_curves,
    shortcut_share,
    updates_heatmap,
)
from gradflow.plots.binning import bin_means
from gradflow.plots.default import default_view
from gradflow.plots.health import health
from gradflow.plots.heatmap import ZeroAwareLogNorm
from gradflow.plots.selection import MAX_GROUPS, is_zoo_fcn, layer_groups, select_layers
from gradflow.plots.style import stat_label
from gradflow.runfile import Layer, Run, open_run

EPOCHS, PER_EPOCH = 4, 10


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    with SyntheticRun(
        root / "a.h5",
        fcn_layers(),
        model="long-short",
        vanishing=["across.0.conv"],
        dead=["up1.1.conv"],
        steps_per_epoch=PER_EPOCH,
    ) as run:
        for _ in range(EPOCHS):
            run.steps(PER_EPOCH).epoch()
        run.nonfinite(23, "across.1.conv")
    write_run(root / "b.h5", layers=fcn_layers(blocks=3), model="long-only", seed=1)
    with SyntheticRun(root / "steps_only.h5", fcn_layers(), steps_per_epoch=PER_EPOCH) as run:
        run.steps(103)
    return root


@pytest.fixture
def run_a(runs_dir: Path) -> Run:
    with open_run(runs_dir / "a.h5") as run:
        yield run


@pytest.fixture
def run_b(runs_dir: Path) -> Run:
    with open_run(runs_dir / "b.h5") as run:
        yield run


def conv(run: Run) -> list[int]:
    return [lay.index for lay in run.layers if lay.kind == "conv"]


def drawn(fig: Figure, panel: int = 0) -> np.ndarray:
    return np.ma.getdata(fig.axes[panel].collections[0].get_array())


def test_updates_heatmap_draws_the_stored_epoch_updates(run_a: Run) -> None:
    fig = updates_heatmap([run_a])
    ax = fig.axes[0]
    stored = run_a.stat("epoch", "update_abs_mean", layers=conv(run_a))
    np.testing.assert_allclose(drawn(fig), stored.T, rtol=1e-6)
    assert ax.get_xlabel() == "epoch"
    assert "input → output" in ax.get_ylabel()
    assert ax.get_ylim() == (len(conv(run_a)), 0)  # input at the top
    assert ax.collections[0].colorbar is not None
    assert "|ΔW|" in ax.collections[0].colorbar.ax.get_ylabel()
    labels = {t.get_text(): t for t in ax.get_yticklabels()}
    assert {"down1", "across", "up2"} <= set(labels)
    assert labels["across"].get_bbox_patch() is not None  # the bottleneck is shaded
    assert labels["down1"].get_bbox_patch() is None


def test_panels_are_lettered_in_run_order_on_a_shared_or_own_scale(run_a: Run, run_b: Run) -> None:
    fig = updates_heatmap([run_a, run_b])
    images = [fig.axes[i].collections[0] for i in range(2)]
    assert [fig.axes[i].get_title("left") for i in range(2)] == ["(a) long-short", "(b) long-only"]
    assert images[0].norm is images[1].norm
    assert len(fig.axes) == 3  # two panels, one colour bar
    np.testing.assert_allclose(
        drawn(fig, 1), run_b.stat("epoch", "update_abs_mean", layers=conv(run_b)).T, rtol=1e-6
    )
    own = updates_heatmap([run_a, run_b], shared_scale=False)
    norms = [own.axes[i].collections[0].norm for i in range(2)]
    assert norms[0] is not norms[1]
    assert len(own.axes) == 4  # a colour bar per panel
    assert norms[0].vmax != norms[1].vmax


def test_log_scale_uses_a_lognorm_and_draws_zeros_as_smallest(run_a: Run) -> None:
    norm = updates_heatmap([run_a], log=True).axes[0].collections[0].norm
    assert isinstance(norm, LogNorm)
    zero_aware = ZeroAwareLogNorm(1e-3, 1.0)
    out = zero_aware(np.array([0.0, 1e-3, 1.0, np.nan]))
    assert out[0] < 0 and not np.ma.is_masked(out[0])  # zero: "under", the smallest colour
    assert out[1] == pytest.approx(0.0) and out[2] == pytest.approx(1.0)
    assert np.ma.is_masked(out[3])  # NaN stays missing


def test_bin_means_equal_a_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(103, 5))
    data[rng.random(data.shape) < 0.2] = np.nan
    data[22:33, 2] = np.nan  # a whole bin missing for one layer
    starts = np.arange(0, 103, 11)
    blocks = ((s, data[s : s + 7]) for s in range(0, 103, 7))  # blocks cut across bins
    got = bin_means(blocks, starts, 5)
    bounds = [*starts, 103]
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        want = np.stack([np.nanmean(data[a:b], axis=0) for a, b in itertools.pairwise(bounds)])
    np.testing.assert_allclose(got, want, equal_nan=True)
    assert np.isnan(got[2, 2])


def test_long_runs_are_binned_along_time_block_by_block(
    runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(binning, "BLOCK_ROWS", 16)
    with open_run(runs_dir / "steps_only.h5") as run:
        fig = updates_heatmap([run], window=TimeWindow("step"), max_bins=10)
        stored = run.stat("param", "update_abs_mean", layers=conv(run))
    k = 11  # ceil(103 / 10) rows per bin
    want = np.stack([stored[a : a + k].mean(axis=0) for a in range(0, 103, k)])
    np.testing.assert_allclose(drawn(fig), want.T, rtol=1e-5)
    ax = fig.axes[0]
    assert ax.get_xlim() == (-0.5, 102.5)
    assert ax.get_xlabel() == "step"


def test_gradient_and_activation_heatmaps_draw_their_statistics(run_a: Run) -> None:
    cols = conv(run_a)
    fig = gradient_heatmap([run_a])
    np.testing.assert_allclose(
        drawn(fig), run_a.stat("grad_output", "norm", layers=cols).T, rtol=1e-6
    )
    fig = gradient_heatmap([run_a], stat="param/update_ratio", all_layers=True)
    np.testing.assert_allclose(drawn(fig), run_a.stat("param", "update_ratio").T, rtol=1e-6)
    fig = activation_heatmap([run_a])
    stored = run_a.stat("activation", "zero_fraction", layers=cols)
    np.testing.assert_allclose(drawn(fig), stored.T, rtol=1e-6)
    norm = fig.axes[0].collections[0].norm
    assert norm.vmin == 0.0 and norm.vmax == 1.0


def test_the_gradient_update_cosine_is_drawn_on_a_fixed_linear_scale(tmp_path: Path) -> None:
    # Cosines are negative (-1 for plain SGD): no log colour, the scale is -1..1.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Recorder(model, opt, tmp_path / "cos.h5", probes="param") as rec:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 4)).square().mean().backward()
            opt.step()
            rec.log()
    with open_run(tmp_path / "cos.h5") as run:
        stored = run.stat("param", "grad_update_cos")
        assert (stored < 0).all()
        assert not default_view([run], "param/grad_update_cos").log
        fig = gradient_heatmap([run], stat="param/grad_update_cos", all_layers=True)
        np.testing.assert_allclose(drawn(fig), stored.T, rtol=1e-6)
        norm = fig.axes[0].collections[0].norm
        assert norm.vmin == -1.0 and norm.vmax == 1.0


@pytest.mark.parametrize("positive_at", [8500, None], ids=["one-late-positive", "none"])
def test_the_default_colour_is_log_where_any_value_is_positive(
    positive_at: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Zeros, and one positive value (or none) past the first block of rows read.
    def zeros(self: SyntheticRun, probe: str, stat: str, steps: np.ndarray) -> np.ndarray:
        values = np.zeros((len(steps), len(self.layers)), np.float32)
        values[steps == positive_at] = 1.0
        return values

    monkeypatch.setattr(SyntheticRun, "_stat", zeros)
    with SyntheticRun(tmp_path / "r.h5", fcn_layers()) as synthetic:
        synthetic.steps(9000)
    with open_run(tmp_path / "r.h5") as run:
        assert default_view([run], "param/grad_norm").log == (positive_at is not None)


def test_per_step_statistic_against_epochs_is_the_epoch_mean(run_a: Run) -> None:
    fig = gradient_heatmap([run_a], window=TimeWindow("epoch", 1, 3))
    stored = run_a.stat("grad_output", "norm", layers=conv(run_a))
    want = np.stack([stored[e * PER_EPOCH : (e + 1) * PER_EPOCH].mean(axis=0) for e in (1, 2)])
    np.testing.assert_allclose(drawn(fig), want.T, rtol=1e-5)
    assert fig.axes[0].get_xlim() == (0.5, 2.5)


def test_layer_patterns_select_by_glob_or_regex(run_a: Run) -> None:
    fig = updates_heatmap([run_a], layers="down*")
    names = [lay.name for lay in run_a.layers if lay.kind == "conv" and lay.name.startswith("down")]
    assert drawn(fig).shape[0] == len(names)
    fig = updates_heatmap([run_a], layers=r"up\d\.0\.(conv|bn)", all_layers=True)
    assert drawn(fig).shape[0] == 4
    with pytest.raises(GradflowError, match="matches no weight layer"):
        updates_heatmap([run_a], layers="*.bn")


def test_diff_heatmap_aligns_layers_by_name_and_reports_the_rest(run_a: Run, run_b: Run) -> None:
    with pytest.warns(PlotWarning, match="only in long-only"):
        fig = diff_heatmap([run_a, run_b])
    common = [lay for lay in run_a.layers if lay.kind == "conv"]
    index_b = {lay.name: lay.index for lay in run_b.layers}
    a = run_a.stat("epoch", "update_abs_mean", layers=[lay.index for lay in common])
    b = run_b.stat("epoch", "update_abs_mean", layers=[index_b[lay.name] for lay in common])
    np.testing.assert_allclose(drawn(fig), (a - b).T, rtol=1e-5, atol=1e-12)
    image = fig.axes[0].collections[0]
    assert isinstance(image.norm, CenteredNorm) and image.norm.vcenter == 0
    legend_title = fig.legends[0].get_title().get_text()
    assert "only in long-only (5)" in legend_title and "down1.2.conv" in legend_title
    with pytest.warns(PlotWarning):
        ratio = diff_heatmap([run_a, run_b], log=True)
    np.testing.assert_allclose(drawn(ratio), np.log10(a / b).T, rtol=1e-5)
    with pytest.raises(GradflowError, match="exactly two runs"):
        diff_heatmap([run_a])


def test_first_nonfinite_event_is_marked_on_heat_maps(run_a: Run, run_b: Run) -> None:
    fig = updates_heatmap([run_a])
    marker = next(line for line in fig.axes[0].lines if line.get_marker() == "X")
    row = [lay.name for lay in run_a.layers if lay.kind == "conv"].index("across.1.conv")
    assert (marker.get_xdata()[0], marker.get_ydata()[0]) == (2, row + 0.5)  # step 23: epoch 2
    assert "first non-finite" in marker.get_label() and "across.1.conv" in marker.get_label()
    assert fig.legends
    steps = gradient_heatmap([run_a], layers="down*")  # event layer not drawn: a time line
    assert any(line.get_xdata()[0] == 23 for line in steps.axes[0].lines)
    assert not updates_heatmap([run_b]).legends


def test_learning_curves_draw_the_stored_metrics(run_a: Run, run_b: Run) -> None:
    fig = learning_curves([run_a, run_b])
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    for run, label in ((run_a, "long-short"), (run_b, "long-only")):
        for metric in ("train_loss", "val_loss"):
            line = lines[f"{label}, {metric}"]
            np.testing.assert_array_equal(line.get_ydata(), run.metrics[metric])
            np.testing.assert_array_equal(line.get_xdata(), run.epochs)
    assert lines["long-short, train_loss"].get_color() != lines["long-only, train_loss"].get_color()
    assert lines["long-short, val_loss"].get_linestyle() == "--"
    v_rand = learning_curves([run_a], stat="v_rand", window=TimeWindow("epoch", 1, None))
    np.testing.assert_array_equal(v_rand.axes[0].lines[0].get_ydata(), run_a.metrics["v_rand"][1:])
    assert v_rand.axes[0].get_ylabel() == "v_rand"
    with pytest.raises(GradflowError, match="did you mean 'v_rand'"):
        learning_curves([run_a], stat="v_rnd")


def test_best_losses_table_markdown_csv_and_figure(run_a: Run, run_b: Run) -> None:
    table = best_losses_table([run_a, run_b])
    best = int(np.argmin(run_a.metrics["val_loss"]))
    assert table.rows[0][:3] == ["long-short", best, pytest.approx(run_a.metrics["val_loss"][best])]
    assert table.rows[0][3] == pytest.approx(run_a.metrics["train_loss"][best])
    markdown = table.to_markdown().splitlines()
    assert markdown[0].startswith("| model | best epoch | best val_loss")
    assert markdown[1].startswith("| --- |") and len(markdown) == 4
    rows = list(csv.reader(io.StringIO(table.to_csv())))
    assert rows[2][0] == "long-only" and float(rows[2][2]) == pytest.approx(table.rows[1][2])
    assert best_losses([run_a, run_b]).axes[0].tables


def test_depth_profile_draws_one_line_per_run_and_time_part(run_a: Run, run_b: Run) -> None:
    fig = depth_profile([run_a], profiles=EPOCHS)
    stored = run_a.stat("epoch", "update_abs_mean", layers=conv(run_a))
    lines = fig.axes[0].lines
    ys = [line.get_ydata() for line in lines if len(line.get_ydata()) == stored.shape[1]]
    np.testing.assert_allclose(np.stack(ys), stored, rtol=1e-6)
    assert [line.get_label() for line in lines][:2] == [
        "long-short, epoch 0",
        "long-short, epoch 1",
    ]
    both = depth_profile([run_a, run_b], profiles=2)
    assert "relative depth" in both.axes[-1].get_xlabel()  # different depths share one axis


def test_depth_profile_over_seeds_draws_the_mean_of_the_runs_with_a_band(
    run_b: Run, tmp_path: Path
) -> None:
    runs = []
    for seed in range(3):
        write_run(tmp_path / f"s{seed}.h5", epochs=3, model="long-9", seed=seed)
        runs.append(open_run(tmp_path / f"s{seed}.h5"))
    try:
        fig = depth_profile([*runs, run_b], log=True)
        panels = {ax.get_ylabel(): ax for ax in fig.axes}
        assert list(panels) == [stat_label("epoch/update_abs_mean"), stat_label("grad_output/norm")]
        for (probe, stat), ax in zip(
            [("epoch", "update_abs_mean"), ("grad_output", "norm")], panels.values(), strict=True
        ):
            per_run = np.stack(
                [np.nanmean(run.stat(probe, stat, layers=conv(run)), axis=0) for run in runs]
            )
            lines = {line.get_label(): line for line in ax.lines}
            mean = lines["long-9 (mean, min–max of 3 runs)"]
            np.testing.assert_allclose(mean.get_ydata(), per_run.mean(axis=0), rtol=1e-6)
            n = per_run.shape[1]
            np.testing.assert_allclose(mean.get_xdata(), (np.arange(n) + 0.5) / n)
            band = ax.collections[0].get_paths()[0].vertices
            for j, x in enumerate(mean.get_xdata()):
                at = band[np.isclose(band[:, 0], x), 1]
                assert at.min() == pytest.approx(per_run[:, j].min(), rel=1e-6)
                assert at.max() == pytest.approx(per_run[:, j].max(), rel=1e-6)
            single = lines["long-only"]  # one run: its own mean over time, no band
            own = np.nanmean(run_b.stat(probe, stat, layers=conv(run_b)), axis=0)
            np.testing.assert_allclose(single.get_ydata(), own, rtol=1e-6)
            assert len(ax.collections) == 1 and ax.get_yscale() == "log"
        legend = fig.legends[0]
        assert [t.get_text() for t in legend.get_texts()] == [
            "long-9 (mean, min–max of 3 runs)",
            "long-only",
        ]
        one = depth_profile(runs, stat="grad_output/rms")
        assert [ax.get_ylabel() for ax in one.axes] == [stat_label("grad_output/rms")]
        with pytest.raises(GradflowError, match="did you mean 'grad_output/norm'"):
            depth_profile(runs, stat="epoch/update_abs_mean,grad_output/nrom")
        with pytest.raises(GradflowError, match="names no statistic"):
            depth_profile(runs, stat=" , ")
        with pytest.raises(GradflowError, match=r"^s0.h5 has no skip statistics: record it with"):
            shortcut_share(runs)
    finally:
        for run in runs:
            run.close()


def test_a_run_being_written_can_be_plotted(tmp_path: Path) -> None:
    path = tmp_path / "live.h5"
    with SyntheticRun(path, fcn_layers(), steps_per_epoch=PER_EPOCH) as writer:
        writer.steps(PER_EPOCH).epoch().commit()
        with open_run(path) as run:
            assert drawn(updates_heatmap([run])).shape[1] == 1
        writer.steps(PER_EPOCH).epoch().steps(5).commit()
        with open_run(path) as run:
            assert drawn(updates_heatmap([run])).shape[1] == 2
            assert drawn(gradient_heatmap([run])).shape[1] == 25


def test_bad_requests_raise_one_clear_error(runs_dir: Path, run_a: Run) -> None:
    with open_run(runs_dir / "steps_only.h5") as run:
        with pytest.raises(GradflowError, match="no closed epochs; use --steps"):
            updates_heatmap([run])
        with pytest.raises(GradflowError, match="no closed epochs"):
            learning_curves([run])
    with pytest.raises(GradflowError, match="did you mean 'grad_output/norm'"):
        gradient_heatmap([run_a], stat="grad_output/nrom")
    with pytest.raises(GradflowError, match="per epoch"):
        updates_heatmap([run_a], stat="epoch/update_ratio", window=TimeWindow("step"))
    with pytest.raises(GradflowError, match="no rows in epochs 7:9"):
        updates_heatmap([run_a], window=TimeWindow("epoch", 7, 9))
    with pytest.raises(GradflowError, match="START:STOP"):
        TimeWindow.parse("1-3", "epoch")
    assert TimeWindow.parse("2:", "step") == TimeWindow("step", 2, None)
    assert TimeWindow.parse("3", "epoch") == TimeWindow("epoch", 3, 4)


def test_health_finds_planted_problems(run_a: Run, run_b: Run) -> None:
    found = {(f.check, f.layer) for f in health(run_a)}
    assert ("vanishing update", "across.0.conv") in found
    assert ("dead units", "up1.1.conv") in found
    assert ("non-finite", "across.1.conv") in found
    assert not health(run_b)


# -- any model: default layers, hierarchical labels, shared scale, curves over seeds -------------
def layer_list(specs: list[tuple[str, str, str]]) -> list[Layer]:
    """Layers from (name, kind, shape) in forward order."""
    return [
        Layer(index=i, name=name, kind=kind, type=kind, depth=i, n_params=1, shape=shape)
        for i, (name, kind, shape) in enumerate(specs)
    ]


def vit_layers(blocks: int = 12) -> list[Layer]:
    """A timm-style ViT: 2 + 6 x blocks + 2 layers (76 for 12 blocks)."""
    specs = [("(root)", "other", "1x1x64+1x65x64"), ("patch_embed.proj", "conv", "64x1x4x4+64")]
    for b in range(blocks):
        specs += [
            (f"blocks.{b}.norm1", "ln", "64+64"),
            (f"blocks.{b}.attn.qkv", "linear", "192x64+192"),
            (f"blocks.{b}.attn.proj", "linear", "64x64+64"),
            (f"blocks.{b}.norm2", "other", "64"),  # an RMSNorm-like class: 1-D only
            (f"blocks.{b}.mlp.fc1", "linear", "256x64+256"),
            (f"blocks.{b}.mlp.fc2", "linear", "64x256+64"),
        ]
    return layer_list([*specs, ("norm", "ln", "64+64"), ("head", "linear", "10x64+10")])


def resnet_layers() -> list[Layer]:
    """torchvision's ResNet-18 names: 21 conv/linear and 20 batch-norm layers."""
    specs = [("conv1", "conv", "8x3x7x7"), ("bn1", "bn", "8+8")]
    for stage in range(1, 5):
        for block in range(2):
            p = f"layer{stage}.{block}"
            specs += [(f"{p}.conv1", "conv", "8x8x3x3"), (f"{p}.bn1", "bn", "8+8")]
            specs += [(f"{p}.conv2", "conv", "8x8x3x3"), (f"{p}.bn2", "bn", "8+8")]
            if stage > 1 and block == 0:
                specs += [
                    (f"{p}.downsample.0", "conv", "8x8x1x1"),
                    (f"{p}.downsample.1", "bn", "8"),
                ]
    return layer_list([*specs, ("fc", "linear", "10x8+10")])


def deep_layers(n: int = 1000) -> list[Layer]:
    return layer_list(
        [*((f"layers.{i}", "linear", "8x8+8") for i in range(n)), ("head", "linear", "1x8")]
    )


def one_epoch_run(path: Path, layers: list[Layer], model: object = "custom") -> Run:
    with SyntheticRun(path, layers, model=model, steps_per_epoch=2) as writer:  # type: ignore[arg-type]
        writer.steps(2).epoch()
    return open_run(path)


def tick_labels(fig: Figure) -> dict[str, float]:
    ax = fig.axes[0]
    return {t.get_text(): y for t, y in zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)}


def test_default_layers_are_zoo_convs_or_any_models_weight_layers(tmp_path: Path) -> None:
    layers = fcn_layers()
    layers.append(Layer(len(layers), "head", "linear", "Linear", len(layers), 330, "10x32+10"))
    zoo_config = {"name": "tiny", "conv_layers": 12, "config": {}}
    with one_epoch_run(tmp_path / "zoo.h5", layers, model=zoo_config) as zoo:
        assert is_zoo_fcn(zoo)
        assert [lay.name for lay in select_layers(zoo)] == [
            lay.name for lay in layers if lay.kind == "conv"
        ]
    with one_epoch_run(tmp_path / "any.h5", layers) as other:
        assert not is_zoo_fcn(other)
        want = [lay.name for lay in layers if lay.kind in ("conv", "linear")]
        assert [lay.name for lay in select_layers(other)] == want
        assert len(select_layers(other, all_layers=True)) == len(layers)
    with one_epoch_run(tmp_path / "vit.h5", vit_layers()) as vit:
        chosen = [lay.name for lay in select_layers(vit)]
        assert len(vit.layers) == 76 and len(chosen) == 51  # no norm of any class
        assert chosen[:3] == ["(root)", "patch_embed.proj", "blocks.0.attn.qkv"]
        assert not any("norm" in name for name in chosen) and chosen[-1] == "head"
    norms_only = layer_list([("a.norm", "ln", "4+4"), ("b.scale", "other", "4")])
    with one_epoch_run(tmp_path / "norms.h5", norms_only) as norms:  # nothing else: draw them
        assert len(select_layers(norms)) == 2


def test_transformer_labels_name_every_block_at_its_rows(tmp_path: Path) -> None:
    with one_epoch_run(tmp_path / "vit.h5", vit_layers()) as vit:
        fig = updates_heatmap([vit])
        rows = [lay.name for lay in select_layers(vit)]
    labels = tick_labels(fig)
    assert {f"blocks.{b}" for b in range(12)} | {"(root)", "head"} <= set(labels)
    for label, y in labels.items():  # each label at the centre of the rows it names
        inside = [i for i, name in enumerate(rows) if name == label or name.startswith(label + ".")]
        assert inside == list(range(inside[0], inside[-1] + 1))
        assert y == pytest.approx((inside[0] + inside[-1] + 1) / 2)
    # GPT-2 style names: the common "transformer" level is skipped for its blocks.
    gpt = [("transformer.wte", "embedding", "100x32"), ("transformer.wpe", "embedding", "32x32")]
    for b in range(12):
        gpt += [(f"transformer.h.{b}.attn.c_attn", "other", "32x96+96")]
        gpt += [(f"transformer.h.{b}.mlp.c_fc", "other", "32x128+128")]
    names = [s.name for s in layer_groups(layer_list(gpt))]
    assert names == ["transformer.wte", "transformer.wpe"] + [
        f"transformer.h.{b}" for b in range(12)
    ]


def test_resnet_labels_are_blocks_with_darker_lines_between_stages(tmp_path: Path) -> None:
    with one_epoch_run(tmp_path / "resnet.h5", resnet_layers()) as resnet:
        fig = updates_heatmap([resnet])
        rows = [lay.name for lay in select_layers(resnet)]
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert list(tick_labels(fig)) == ["conv1", *blocks, "fc"]
    stage_starts = [
        i for i in range(1, len(rows)) if rows[i].split(".")[0] != rows[i - 1].split(".")[0]
    ]
    lines = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    dark = sorted(line.get_ydata()[0] for line in lines if line.get_linewidth() == 0.7)
    light = sorted(line.get_ydata()[0] for line in lines if line.get_linewidth() == 0.4)
    assert dark == stage_starts  # conv1 | layer1 | layer2 | layer3 | layer4 | fc
    assert light == [rows.index(f"layer{s}.1.conv1") for s in range(1, 5)]


def test_a_deep_fcn_is_labelled_by_stage_and_a_1000_layer_model_by_ranges(tmp_path: Path) -> None:
    fcn = fcn_layers(blocks=9, bn=False)  # 47 blocks: too many; stages instead
    assert [s.name for s in layer_groups(fcn)] == [
        "down1",
        "down2",
        "across",
        "up1",
        "up2",
        "final",
        "classifier",
    ]
    with one_epoch_run(tmp_path / "deep.h5", deep_layers()) as deep:
        fig = updates_heatmap([deep])
        assert drawn(fig).shape[0] == 1001
    labels = list(tick_labels(fig))
    assert len(labels) <= MAX_GROUPS
    assert labels == [f"layers.{i}–{i + 99}" for i in range(0, 1000, 100)] + ["head"]
    assert len(fig.axes[0].lines) <= MAX_GROUPS  # separators stay countable too
    flat = layer_list([(str(i), "linear", "4x4") for i in range(1000)])  # nn.Sequential names
    assert [s.name for s in layer_groups(flat)] == [f"{i}–{i + 49}" for i in range(0, 1000, 50)]


def test_shared_scale_gives_every_panel_one_norm(runs_dir: Path, tmp_path: Path) -> None:
    paths = [runs_dir / "a.h5", runs_dir / "b.h5"]
    for seed in (2, 3):
        paths.append(write_run(tmp_path / f"s{seed}.h5", layers=fcn_layers(blocks=seed), seed=seed))
    runs = [open_run(p) for p in paths]
    try:
        stored = [run.stat("epoch", "update_abs_mean", layers=conv(run)) for run in runs]
        for log in (False, True):
            fig = updates_heatmap(runs, log=log, shared_scale=True)
            norms = [fig.axes[i].collections[0].norm for i in range(4)]
            keep = [v[v > 0] if log else v for v in stored]
            lo, hi = min(v.min() for v in keep), max(v.max() for v in keep)
            for norm in norms:
                assert (norm.vmin, norm.vmax) == pytest.approx((lo, hi), rel=1e-6)
            assert len(fig.axes) == 5  # four panels, one colour bar
            own = updates_heatmap(runs, log=log, shared_scale=False)
            norms = [own.axes[i].collections[0].norm for i in range(4)]
            limits = [(norm.vmin, norm.vmax) for norm in norms]
            want = [(v.min(), v.max()) for v in keep]
            np.testing.assert_allclose(limits, want, rtol=1e-6)
            assert len({lim[1] for lim in limits}) == 4  # the panels do differ
    finally:
        for run in runs:
            run.close()


def test_learning_curves_over_seeds_are_a_mean_with_a_min_max_band(
    run_a: Run, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    losses = rng.uniform(0.1, 1.0, (3, 5, 2))  # seed, epoch, (train, val)
    runs = []
    for seed in range(3):
        with SyntheticRun(tmp_path / f"s{seed}.h5", fcn_layers(), model="long-9", seed=seed) as run:
            for e in range(5):
                run.steps(10).epoch(
                    {"train_loss": losses[seed, e, 0], "val_loss": losses[seed, e, 1]}
                )
        runs.append(open_run(tmp_path / f"s{seed}.h5"))
    try:
        fig = learning_curves([*runs, run_a])
    finally:
        for run in runs:
            run.close()
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    for m, metric in enumerate(("train_loss", "val_loss")):
        line = lines[f"long-9, {metric} (mean, min–max of 3 runs)"]
        np.testing.assert_allclose(line.get_ydata(), losses[:, :, m].mean(axis=0), rtol=1e-12)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(5))
        band = ax.collections[m].get_paths()[0].vertices
        for e in range(5):
            at = band[np.isclose(band[:, 0], e), 1]
            assert at.min() == pytest.approx(losses[:, e, m].min(), rel=1e-12)
            assert at.max() == pytest.approx(losses[:, e, m].max(), rel=1e-12)
    single = lines["long-short, train_loss"]  # a model with one run: its stored values
    np.testing.assert_array_equal(single.get_ydata(), run_a.metrics["train_loss"])
    assert len(ax.collections) == 2  # no band for a single run
