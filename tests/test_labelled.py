"""``Run.to_xarray()``: every value against ``run.stat`` and the file read with h5py, the
coordinates and attributes, and the round trip through netCDF."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from runfiles import SyntheticRun, fcn_layers

from gradflow.errors import GradflowError
from gradflow.labelled import statistic_name, variable_name
from gradflow.runfile import open_run

xr = pytest.importorskip("xarray", reason="xarray is not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "run.h5"
    config = {
        "optimizer": {"name": "sgd", "lr": 0.01, "nesterov": True, "betas": [0.9, 0.99]},
        "note": None,
    }
    with SyntheticRun(path, fcn_layers(), config=config, steps_per_epoch=5) as run:
        for _ in range(3):
            run.steps(5).epoch()
        run.steps(2)  # a fourth epoch not closed: 17 steps, 3 epochs
    return path


def test_every_statistic_with_its_coordinates(run_file: Path) -> None:
    with open_run(run_file) as run:
        ds = run.to_xarray()
        stats = [f"{p}/{s}" for p, names in run.probes().items() for s in names]
        stats += [f"epoch/{s}" for s in run.epoch_stats()]
        for stat in stats:
            var = ds[variable_name(stat)]
            probe, name = stat.split("/")
            assert var.dims == (("epoch" if probe == "epoch" else "step"), "layer")
            assert var.attrs["statistic"] == stat
            np.testing.assert_array_equal(var.values, run.stat(probe, name))
    with h5py.File(run_file, "r") as f:
        n_steps, n_epochs, _ = (int(c) for c in f["counts"][()])
        assert (n_steps, n_epochs) == (17, 3)
        np.testing.assert_array_equal(ds["param__grad_norm"], f["stats/param/grad_norm"][:n_steps])
        np.testing.assert_array_equal(ds["epoch__update_norm"], f["epochs/update_norm"][:n_epochs])
        np.testing.assert_array_equal(ds["step"], f["steps"][:n_steps])
        np.testing.assert_array_equal(ds["epoch_of_step"], f["epoch"][:n_steps])
        np.testing.assert_array_equal(ds["time"], f["time"][:n_steps])
        np.testing.assert_array_equal(ds["loss"], f["loss"][:n_steps])
        np.testing.assert_array_equal(ds["epoch"], f["epochs/index"][:n_epochs])
        np.testing.assert_array_equal(ds["end_step"], f["epochs/end_step"][:n_epochs])
        table = f["layers"][()]
        assert list(ds["layer"].values) == [r["name"].decode() for r in table]
        assert list(ds["kind"].values) == [r["kind"].decode() for r in table]
        np.testing.assert_array_equal(ds["depth"], table["depth"])
        np.testing.assert_array_equal(ds["n_params"], table["n_params"])
        names = [n.decode() for n in f["epochs/metrics/names"][()] if n]
        values = f["epochs/metrics/values"][:n_epochs]
        for i, name in enumerate(names):
            np.testing.assert_array_equal(ds[f"metric__{name}"], values[:, i])
        assert json.loads(ds.attrs["config"]) == json.loads(f.attrs["config"])
    # The stage: the group the report's layer axis labels (here the blocks, down1.0 ...).
    expected = [n.rsplit(".", 1)[0] if n.count(".") == 2 else n for n in ds["layer"].values]
    assert list(ds["stage"].values) == expected
    assert expected[:2] == ["down1.0", "down1.0"] and expected[-2:] == ["final.conv", "classifier"]
    assert ds.sel(layer="down2.1.conv")["param__grad_norm"].shape == (17,)


def test_attributes_are_netcdf_types(run_file: Path) -> None:
    with open_run(run_file) as run:
        attrs = run.to_xarray().attrs
    assert attrs["config.optimizer.lr"] == 0.01
    assert attrs["config.optimizer.nesterov"] == 1  # booleans as 0 / 1
    assert attrs["config.optimizer.betas"] == "[0.9, 0.99]"  # lists as JSON text
    assert attrs["config.note"] == "null"
    assert attrs["config.model"] == "tiny-fcn"
    assert attrs["source_file"] == "run.h5" and attrs["device"] == "cpu"
    assert all(type(v) in (str, int, float) for v in attrs.values())


@pytest.mark.parametrize("engine", ["h5netcdf", "scipy"])
def test_netcdf_round_trip(run_file: Path, tmp_path: Path, engine: str) -> None:
    pytest.importorskip(engine)
    with open_run(run_file) as run:
        ds = run.to_xarray()
    out = tmp_path / f"run-{engine}.nc"
    ds.to_netcdf(out, engine=engine)
    back = xr.load_dataset(out, engine=engine)
    xr.testing.assert_identical(back, ds)  # values (NaN included), coordinates, attributes
    assert np.isnan(back["metric__val_loss"]).sum() == np.isnan(ds["metric__val_loss"]).sum()


def test_variable_names_map_back() -> None:
    for stat in ("param/grad_norm", "grad_output/norm", "epoch/update_abs_mean"):
        assert "/" not in variable_name(stat)
        assert statistic_name(variable_name(stat)) == stat


def test_without_xarray_one_clear_line(run_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray now fails
    with open_run(run_file) as run, pytest.raises(GradflowError) as caught:
        run.to_xarray()
    assert str(caught.value) == (
        "Run.to_xarray() needs xarray: pip install 'gradflow-skips[notebook]'"
    )
