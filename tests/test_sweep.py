"""``gradflow.sweep`` and ``gradflow sweep``: the structure found from configs, the scalars
per run (against numpy on the arrays read with h5py), the figures, the summary cache."""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from runfiles import fcn_layers, write_run
from sweeps import MODELS, OPTIMIZERS, ablation_config, run_name, write_ablation

import gradflow
from gradflow.cli.main import main
from gradflow.errors import GradflowError, GradflowWarning
from gradflow.plots.binning import LayerTime
from gradflow.sweeps import core, find_structure, summary
from gradflow.sweeps.page import payload

SEEDS = range(3)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 models x 2 optimizers x 3 seeds (the browser test sweeps the 40-run ablation)."""
    folder = tmp_path_factory.mktemp("ablation")
    write_ablation(folder, SEEDS)
    return folder


# -- independent computations on the raw file ---------------------------------------------
def conv_columns(f: h5py.File) -> list[int]:
    """File columns of the conv layers, input first."""
    table = f["layers"][()]
    convs = [i for i, r in enumerate(table) if r["kind"] == b"conv"]
    return sorted(convs, key=lambda i: (int(table[i]["depth"]), i))


def raw_scalars(path: Path) -> dict[str, float]:
    with h5py.File(path, "r") as f:
        n_steps, n_epochs, _ = (int(c) for c in f["counts"][()])
        epoch, loss = f["epoch"][:n_steps], f["loss"][:n_steps].astype(np.float64)
        final = float(loss[epoch == epoch[-1]].mean())
        columns = conv_columns(f)
        per_layer = f["epochs/update_abs_mean"][:n_epochs][:, columns].astype(np.float64).mean(0)
        third = len(columns) // 3
        centre = per_layer[third : len(columns) - third].mean()
        edges = np.concatenate([per_layer[:third], per_layer[len(columns) - third :]]).mean()
        names = [n.decode() for n in f["epochs/metrics/names"][()]]
        val = f["epochs/metrics/values"][:n_epochs, names.index("val_loss")]
    return {
        "final_loss": final,
        "centre_edge": float(centre / edges),
        "best_val_loss": float(val.min()),
    }


# -- structure ----------------------------------------------------------------------------
def test_the_structure_of_an_ablation_is_found_from_the_configs() -> None:
    models = {f"m{i}": i + 2 for i in range(4)}
    configs = [
        {
            "model": {"name": m, "depth": d, "width": 8, "blocks": [d] * 3},
            "optimizer": {
                "name": o,
                "momentum": 0.9 if o == "sgd" else 0.0,
                "lr": (1e-2 if o == "sgd" else 1e-3) / (10 if m == "m3" else 1),
            },
            "seed": s,
            "data": {"path": "em", "seed_file": f"split-{s}.json"},
            "command": f"gradflow record --model {m} --seed {s} --out {m}-{o}-{s}.h5",
        }
        for m, d in models.items()
        for o in ("rmsprop", "sgd")
        for s in range(5)
    ]
    random.Random(0).shuffle(configs)
    found = find_structure(configs)
    assert found.factors == ["model.name", "optimizer.name"]
    assert found.seed == "seed"
    assert found.levels == {
        "model.name": list(models),
        "optimizer.name": ["rmsprop", "sgd"],
        "seed": [0, 1, 2, 3, 4],
    }
    assert found.follows == {
        "model.depth": ["model.name"],
        "model.blocks": ["model.name"],
        "optimizer.momentum": ["optimizer.name"],
        "optimizer.lr": ["model.name", "optimizer.name"],
        "data.seed_file": ["seed"],
    }
    assert found.columns == ["model.name", "optimizer.name", "seed", "optimizer.lr"]
    assert found.describe() == (
        "model.name (4) x optimizer.name (2) x seed (5): 40 runs, every combination"
    )
    assert found.follow_notes() == [
        "model.name sets model.blocks, model.depth",
        "optimizer.name sets optimizer.momentum",
        "seed sets data.seed_file",
    ]
    # Runs still missing: the same structure, and the design says what is missing.
    partial = find_structure(
        [c for c in configs if not (c["model"]["name"] == "m1" and c["optimizer"]["name"] == "sgd")]
    )
    assert partial.factors == found.factors and partial.seed == "seed"
    assert partial.describe().endswith("35 runs, 1 combinations missing")


@pytest.mark.parametrize(
    ("configs", "factors", "seed"),
    [
        ([{"lr": 0.1, "seed": 0}], [], None),  # one run: nothing differs
        ([{"lr": 0.1, "seed": 0}] * 3, [], None),  # the same config three times
        ([{"lr": lr, "seed": 0} for lr in (0.1, 0.01, 0.001)], ["lr"], None),  # one seed each
        ([{"lr": lr, "seed": i} for i, lr in enumerate((0.1, 0.01))], ["lr"], None),
        ([{"lr": 0.1, "seed": s} for s in range(4)], [], "seed"),  # only seeds
        (
            [{"lr": lr, "wd": wd, "seed": s} for lr in (1, 2) for wd in (3, 4) for s in (0, 1)],
            ["lr", "wd"],
            "seed",
        ),
    ],
)
def test_small_designs(configs: list[dict[str, Any]], factors: list[str], seed: str | None) -> None:
    found = find_structure(configs)
    assert found.factors == factors
    assert found.seed == seed


# -- runs, scalars, figures -------------------------------------------------------------
def test_one_row_per_run_with_the_differing_settings_and_scalars(ablation: Path) -> None:
    sweep = gradflow.sweep(ablation)
    assert repr(sweep) == "Sweep(12 run files, not read yet)"
    frame = sweep.to_dataframe()
    assert len(frame) == 12 and not sweep.skipped
    assert list(frame.columns[:5]) == [
        "path",
        "model.name",
        "optimizer.name",
        "seed",
        "optimizer.lr",
    ]
    assert {"model.conv_layers", "model.blocks", "optimizer.momentum"} <= set(frame.columns)
    assert "command" not in frame.columns
    for row in frame.itertuples(index=False):
        path = Path(row.path)
        config = ablation_config(row[1], row[2], row.seed)
        assert path.name == run_name(row[1], row[2], row.seed)
        assert row[4] == config["optimizer"]["lr"]
        expected = raw_scalars(path)
        for name, value in expected.items():
            assert getattr(row, name) == pytest.approx(value, rel=1e-6), (path.name, name)


def test_small_multiples_are_seed_means_of_the_stored_values(ablation: Path) -> None:
    sweep = gradflow.sweep(ablation)
    fig = sweep.heatmap_figure("epoch/update_abs_mean")
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert [t.hovertemplate.split("<extra>")[1] for t in heat] == [
        f"{m} · {o} (3 runs)</extra>" for m in MODELS for o in OPTIMIZERS
    ]
    for trace, (model, optimizer) in zip(
        heat, [(m, o) for m in MODELS for o in OPTIMIZERS], strict=True
    ):
        stack = []
        for seed in SEEDS:
            with h5py.File(ablation / run_name(model, optimizer, seed), "r") as f:
                stack.append(f["epochs/update_abs_mean"][()][:, conv_columns(f)].astype(np.float64))
        mean = np.mean(stack, axis=0).T  # layers x epochs
        assert np.allclose(np.asarray(trace.customdata, np.float64), mean, rtol=1e-6)
        assert np.allclose(np.asarray(trace.z), np.log10(mean), rtol=1e-6)
    assert fig.layout.coloraxis.cmax == pytest.approx(
        max(np.log10(np.asarray(t.customdata, np.float64)).max() for t in heat), rel=1e-6
    )


def test_a_scalar_against_a_setting_with_the_seeds_as_a_band(ablation: Path) -> None:
    sweep = gradflow.sweep(ablation)
    assert sweep.default_x() == "model.name"  # no numeric factor: the first
    fig = sweep.scalar_figure("final_loss", "optimizer.name")
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert [t.name for t in lines] == list(MODELS)
    for line, band, model in zip(lines, bands, MODELS, strict=True):
        values = [
            [raw_scalars(ablation / run_name(model, o, s))["final_loss"] for s in SEEDS]
            for o in OPTIMIZERS
        ]
        assert list(line.x) == list(OPTIMIZERS)
        assert np.allclose(line.y, [np.mean(v) for v in values], rtol=1e-6)
        assert np.allclose(band.y, [max(v) for v in values] + [min(v) for v in values[::-1]])
    # A setting that follows from two factors (the learning rate) is one line over all runs.
    fig = sweep.scalar_figure("final_loss", "lr")
    assert fig.layout.xaxis.title.text == "optimizer.lr"
    assert len([t for t in fig.data if t.mode == "lines+markers"]) == 1
    assert fig.layout.xaxis.type == "log"


def test_bad_settings_and_statistics_are_one_line_errors(ablation: Path) -> None:
    sweep = gradflow.sweep(sorted(ablation.glob("tiny-a-*-s0.h5")))
    with pytest.raises(GradflowError, match=r"did you mean 'optimizer\.name'"):
        sweep.scalar_figure("final_loss", "optimizer.nam")
    with pytest.raises(GradflowError, match="unknown sweep scalar 'final'"):
        sweep.scalar_figure("final")
    with pytest.raises(GradflowError, match="no run holds activation/std"):
        _ = gradflow.sweep(ablation / "tiny-a-sgd-s0.h5", stats=["activation/std"]).stats
    with pytest.raises(GradflowError, match="no such run file or folder"):
        gradflow.sweep(ablation / "nope")


def test_hundreds_of_runs_make_one_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 runs (3 x 4 x 5 settings x 5 seeds), summaries made in memory: the structure,
    one table row per run and one small multiple per combination."""
    layers = fcn_layers()
    settings = [
        {"model": m, "optimizer": {"lr": lr, "weight_decay": wd}, "seed": s}
        for m in ("a", "b", "c")
        for wd in (0.0, 1e-5, 1e-4, 1e-3)
        for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
        for s in range(5)
    ]
    paths = []
    for i in range(len(settings)):
        paths.append(tmp_path / f"r{i:03d}.h5")
        paths[-1].touch()
    rng = np.random.default_rng(0)

    def fake(path: Path, stats: list[str], bins: int, cache: Any) -> summary.RunSummary:
        config = settings[paths.index(path)]
        epochs = np.arange(10)
        heat = LayerTime(
            rng.lognormal(-7, 1, (10, len(layers))),
            np.arange(11) - 0.5,
            np.stack([epochs, epochs], 1),
            "epoch",
            "epoch/update_abs_mean",
            layers,
        )
        scalars = {
            "final_loss": float(config["optimizer"]["lr"]),
            "centre_edge": 1.0,
            "best_val_loss": math.nan,
        }
        return summary.RunSummary(
            path, "tiny", config, 100, 10, scalars, layers, {"epoch/update_abs_mean": heat}
        )

    monkeypatch.setattr(core, "summarise", fake)
    sweep = gradflow.sweep(tmp_path, stats=["epoch/update_abs_mean"])
    out = sweep.write_html(tmp_path / "sweep.html")
    assert sweep.structure.describe() == (
        "model (3) x optimizer.weight_decay (4) x optimizer.lr (5) x seed (5): "
        "300 runs, every combination"
    )
    assert sweep.default_x() == "optimizer.lr"
    data = payload(sweep, None)
    assert len(data["table"]["rows"]) == 300
    (heat,) = data["heatmaps"]
    assert sum(t["type"] == "heatmap" for t in heat["figure"]["data"]) == 60
    assert out.stat().st_size < 20e6


# -- cache ----------------------------------------------------------------------------------
def test_each_run_is_summarised_once_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path / "cache"))
    paths = [write_run(tmp_path / f"r{i}.h5", epochs=2, seed=i, compact=False) for i in range(3)]
    first = gradflow.sweep(paths).to_dataframe()
    entries = sorted((tmp_path / "cache" / "sweep").glob("*.npz"))
    assert len(entries) == 3
    opened: list[Path] = []
    real_open = summary.open_run

    def counting(path: Any) -> Any:
        opened.append(Path(path))
        return real_open(path)

    monkeypatch.setattr(summary, "open_run", counting)
    again = gradflow.sweep(paths).to_dataframe()
    assert opened == [] and again.equals(first)
    # A changed file (new modification time) is summarised again, and only it.
    stat = paths[1].stat()
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _ = gradflow.sweep(paths).summaries
    assert opened == [paths[1]]
    # A damaged cache entry is recomputed, not trusted.
    for entry in (tmp_path / "cache" / "sweep").glob("*.npz"):
        entry.write_bytes(b"not an npz")
    opened.clear()
    assert gradflow.sweep(paths).to_dataframe().equals(first)
    assert sorted(opened) == sorted(paths)


def test_an_unwritable_cache_warns_once_and_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be\n")
    monkeypatch.setenv("GRADFLOW_CACHE_DIR", str(blocker))
    paths = [write_run(tmp_path / f"r{i}.h5", epochs=1, compact=False) for i in range(2)]
    with pytest.warns(GradflowWarning, match="cannot write the sweep cache") as caught:
        assert len(gradflow.sweep(paths).summaries) == 2
    assert len(caught) == 1


def test_an_unfinished_run_is_left_out_of_its_cell_mean(tmp_path: Path) -> None:
    for seed in range(3):
        write_run(tmp_path / f"s{seed}.h5", epochs=2 if seed == 2 else 3, seed=seed, compact=False)
    fig = gradflow.sweep(tmp_path, cache=False).heatmap_figure("epoch/update_abs_mean")
    (trace,) = fig.data
    assert trace.hovertemplate.endswith("<extra>all runs (2 of 3 runs)</extra>")
    assert np.asarray(trace.customdata).shape[1] == 3


# -- command line ---------------------------------------------------------------------------
def gradflow_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    try:
        status = main([str(a) for a in args])
    except SystemExit as done:
        status = int(done.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_writes_the_page_and_says_what_it_found(
    capsys: pytest.CaptureFixture[str], ablation: Path, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    for path in sorted(ablation.glob("tiny-a-*-s[01].h5")):
        shutil.copy(path, runs / path.name)
    (runs / "broken.h5").write_text("not a run\n")
    out = tmp_path / "sweep.html"
    status, stdout, err = gradflow_cli(capsys, "sweep", runs, "--out", out, "--x", "seed")
    assert status == 0, err
    assert stdout.splitlines() == [
        "optimizer.name (2) x seed (2): 4 runs, every combination",
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)",
    ]
    broken = runs / "broken.h5"
    assert f"gradflow: warning: skipped {broken}: not an HDF5 file, so not a gradflow run\n" in err
    assert out.read_text().startswith("<!DOCTYPE html>")
    for args, message in [
        ((runs,), "missing --out FILE.html"),
        ((runs, "--out", out), "file exists; pass --force"),
        ((runs, "--out", tmp_path / "x.png"), "name it .html"),
        ((runs, "--out", tmp_path / "y.html", "--x", "depth"), "unknown setting"),
        ((tmp_path / "none", "--out", tmp_path / "z.html"), "no such run file or folder"),
    ]:
        status, _, err = gradflow_cli(capsys, "sweep", *args)
        *before, last = err.splitlines()
        assert status == 2 and last.startswith("gradflow: error: ") and message in last, err
        assert before in ([], ["summarising 5 run files..."])
