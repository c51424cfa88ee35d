"""Figures draw exactly the data stored in the run file (gradflow.plots)."""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import CenteredNorm, LogNorm
from matplotlib.figure import Figure
from runfiles import SyntheticRun, fcn_layers, write_run

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
    updates_heatmap,
)
from gradflow.plots.binning import bin_means
from gradflow.plots.health import health
from gradflow.plots.heatmap import ZeroAwareLogNorm
from gradflow.store import Run, open_run

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
    return np.ma.getdata(fig.axes[panel].images[0].get_array())


def test_updates_heatmap_draws_the_stored_epoch_updates(run_a: Run) -> None:
    fig = updates_heatmap([run_a])
    ax = fig.axes[0]
    stored = run_a.stat("epoch", "update_abs_mean", layers=conv(run_a))
    np.testing.assert_allclose(drawn(fig), stored.T, rtol=1e-6)
    assert ax.get_xlabel() == "epoch"
    assert "input → output" in ax.get_ylabel()
    assert ax.get_ylim() == (len(conv(run_a)), 0)  # input at the top
    assert ax.images[0].colorbar is not None
    assert "|ΔW|" in ax.images[0].colorbar.ax.get_ylabel()
    labels = {t.get_text(): t for t in ax.get_yticklabels()}
    assert {"down1", "across", "up2"} <= set(labels)
    assert labels["across"].get_bbox_patch() is not None  # the bottleneck is shaded
    assert labels["down1"].get_bbox_patch() is None


def test_panels_are_lettered_in_run_order_on_a_shared_or_own_scale(run_a: Run, run_b: Run) -> None:
    fig = updates_heatmap([run_a, run_b])
    images = [fig.axes[i].images[0] for i in range(2)]
    assert [fig.axes[i].get_title("left") for i in range(2)] == ["(a) long-short", "(b) long-only"]
    assert images[0].norm is images[1].norm
    assert len(fig.axes) == 3  # two panels, one colour bar
    np.testing.assert_allclose(
        drawn(fig, 1), run_b.stat("epoch", "update_abs_mean", layers=conv(run_b)).T, rtol=1e-6
    )
    own = updates_heatmap([run_a, run_b], shared_scale=False)
    norms = [own.axes[i].images[0].norm for i in range(2)]
    assert norms[0] is not norms[1]
    assert len(own.axes) == 4  # a colour bar per panel
    assert norms[0].vmax != norms[1].vmax


def test_log_scale_uses_a_lognorm_and_draws_zeros_as_smallest(run_a: Run) -> None:
    norm = updates_heatmap([run_a], log=True).axes[0].images[0].norm
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
    assert fig.axes[0].images[0].norm.vmin == 0.0 and fig.axes[0].images[0].norm.vmax == 1.0


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
    image = fig.axes[0].images[0]
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
    assert "relative depth" in both.axes[0].get_xlabel()  # different depths share one axis


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
