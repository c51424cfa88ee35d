"""The centre/edge update ratio against a plain numpy computation, and its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from runfiles import fcn_layers, write_run

from gradflow import GradflowError, open_run
from gradflow.analysis import centre_edge_ratio
from gradflow.plots.tables import centre_edge_table


def _numpy_ratio(path: Path, probe: str = "epoch", stat: str = "update_abs_mean") -> float:
    with open_run(path) as run:
        conv = [lay for lay in sorted(run.layers, key=lambda lay: lay.depth) if lay.kind == "conv"]
        per_layer = run.stat(probe, stat)[:, [lay.index for lay in conv]].astype(np.float64)
        per_layer = per_layer.mean(axis=0)
    n = len(per_layer)
    k = n // 3
    middle = per_layer[k : n - k]
    outer = np.r_[per_layer[:k], per_layer[n - k :]]
    return float(middle.mean() / outer.mean())


def test_centre_edge_ratio_matches_numpy(tmp_path: Path) -> None:
    path = write_run(tmp_path / "a.h5", layers=fcn_layers(blocks=3))
    with open_run(path) as run:
        got = centre_edge_ratio(run)
    assert got == pytest.approx(_numpy_ratio(path), rel=1e-6)
    assert got < 1  # the synthetic runs starve the middle, like a long-skip-only FCN


def test_centre_edge_ratio_of_a_step_statistic(tmp_path: Path) -> None:
    path = write_run(tmp_path / "a.h5", layers=fcn_layers(blocks=3))
    with open_run(path) as run:
        got = centre_edge_ratio(run, "norm", probe="grad_output")
        assert got != pytest.approx(centre_edge_ratio(run))
    assert got == pytest.approx(_numpy_ratio(path, "grad_output", "norm"), rel=1e-6)
    with (
        open_run(write_run(tmp_path / "none.h5", epochs=0)) as run,
        pytest.raises(GradflowError, match="no recorded steps"),
    ):
        centre_edge_ratio(run, "norm", probe="grad_output")


def test_centre_edge_needs_epochs_and_layers(tmp_path: Path) -> None:
    path = write_run(tmp_path / "e.h5", epochs=0)
    with open_run(path) as run, pytest.raises(GradflowError, match="no closed epochs"):
        centre_edge_ratio(run)
    with (
        open_run(write_run(tmp_path / "k.h5")) as run,
        pytest.raises(GradflowError, match="at least 3"),
    ):
        centre_edge_ratio(run, kind="linear")


def test_centre_edge_table_groups_runs_by_model(tmp_path: Path) -> None:
    paths = [
        write_run(tmp_path / f"s{seed}.h5", seed=seed, layers=fcn_layers(blocks=3))
        for seed in (0, 1)
    ]
    runs = [open_run(p) for p in paths]
    table = centre_edge_table(runs)
    ratios = [_numpy_ratio(p) for p in paths]
    assert len(table.rows) == 1 and table.rows[0][1] == 2
    assert table.rows[0][2] == pytest.approx(np.mean(ratios), rel=1e-6)
    assert table.rows[0][3] == pytest.approx(min(ratios), rel=1e-6)
    out = tmp_path / "t.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradflow.cli.main",
            "plot",
            "centre-edge",
            *map(str, paths),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "centre/edge" in out.read_text()
