"""``gradflow plot`` and ``gradflow info`` end to end, through the real entry point."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure
from runfiles import STEP_STATS, SyntheticRun, fcn_layers, write_run

from gradflow.cli.main import main
from gradflow.plots import FIGURES, output, render
from gradflow.runfile import Run

MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    stats = {**STEP_STATS, "skip": ["shortcut_share", "long_share"]}  # every figure draws
    with SyntheticRun(
        root / "a.h5",
        fcn_layers(),
        model="long-short",
        vanishing=["down2.1.conv"],
        step_stats=stats,
    ) as run:
        for _ in range(3):
            run.steps(10).epoch()
        run.nonfinite(12, "up1.0.conv")
    write_run(
        root / "b.h5", epochs=3, layers=fcn_layers(blocks=3), model="long-only", step_stats=stats
    )
    with SyntheticRun(root / "steps.h5", fcn_layers()) as run:
        run.steps(20)
    (root / "notes.h5").write_text("not a run\n")
    return {
        "a": root / "a.h5",
        "b": root / "b.h5",
        "steps": root / "steps.h5",
        "text": root / "notes.h5",
    }


def gradflow(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """Run the command line in this process; returns (exit status, stdout, stderr)."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as done:
        status = int(done.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_list_shows_every_figure_with_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = gradflow(capsys, "plot", "--list")
    assert status == 0
    for name in FIGURES:
        assert any(
            line.startswith(name) and FIGURES.summary(name) in line for line in out.splitlines()
        )


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
@pytest.mark.parametrize("figure", FIGURES.names())
def test_every_figure_in_every_format(
    capsys: pytest.CaptureFixture[str],
    runs: dict[str, Path],
    tmp_path: Path,
    figure: str,
    suffix: str,
) -> None:
    out = tmp_path / f"figure{suffix}"
    status, stdout, err = gradflow(capsys, "plot", figure, runs["a"], runs["b"], "--out", out)
    assert status == 0, err
    assert out.read_bytes().startswith(MAGIC[suffix])
    assert f"wrote {out}" in stdout


@pytest.mark.parametrize("suffix", [".md", ".csv"])
def test_best_losses_as_text(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path], tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"best{suffix}"
    status, _, err = gradflow(capsys, "plot", "best-losses", runs["a"], runs["b"], "-o", out)
    assert status == 0, err
    text = out.read_text()
    assert "long-short" in text and "long-only" in text and "best val_loss" in text
    assert text.startswith("| model |") == (suffix == ".md")


@pytest.mark.parametrize(
    "options",
    [
        ["--steps", ":", "--log", "--title", "steps"],
        ["--epochs", "1:3", "--per-panel-scale", "--all-layers"],
        ["--layers", "down*", "--stat", "epoch/update_ratio"],
    ],
)
def test_heatmap_options(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path], tmp_path: Path, options: list[str]
) -> None:
    out = tmp_path / "u.png"
    status, _, err = gradflow(
        capsys, "plot", "updates-heatmap", runs["a"], runs["b"], "-o", out, *options
    )
    assert status == 0, err
    assert out.stat().st_size > 0


def test_diff_heatmap_warns_about_unmatched_layers(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path], tmp_path: Path
) -> None:
    status, _, err = gradflow(
        capsys, "plot", "diff-heatmap", runs["a"], runs["b"], "-o", tmp_path / "d.png", "--log"
    )
    assert status == 0
    assert err.startswith("gradflow: warning: diff-heatmap: layers only in long-only (5)")


def test_force_overwrites(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "u.png"
    out.write_bytes(b"old")
    status, _, _ = gradflow(capsys, "plot", "updates-heatmap", runs["a"], "-o", out, "--force")
    assert status == 0 and out.read_bytes().startswith(MAGIC[".png"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["updates-heatmap", "{missing}"], "no such run file"),
        (["updates-heatmap", "{text}"], "not an HDF5 file"),
        (
            ["updates-heatmap", "{steps}"],
            "has no closed epochs; use --steps or a per-step statistic",
        ),
        (["learning-curves", "{steps}"], "has no closed epochs"),
        (
            ["gradient-heatmap", "{a}", "--stat", "grad_output/rsm"],
            "did you mean 'grad_output/rms'",
        ),
        (
            ["updates-heatmp", "{a}"],
            "unknown figure 'updates-heatmp'; did you mean 'updates-heatmap'",
        ),
        (["updates-heatmap", "{a}", "--layers", "nothing*"], "matches no weight layer"),
        (["updates-heatmap", "{a}", "--out", "{existing}"], "file exists; pass --force"),
        (["updates-heatmap", "{a}", "--out", "{jpg}"], "unknown output type '.jpg'"),
        (["learning-curves", "{a}", "--layers", "down*"], "learning-curves takes no layers option"),
        (["updates-heatmap", "{a}", "--out", "{md}"], "updates-heatmap is an image"),
        (["updates-heatmap", "{a}", "--epochs", "1:2", "--steps", "0:5"], "exclude each other"),
        (["updates-heatmap", "{a}", "--epochs", "one"], "--epochs expects START:STOP"),
        (["updates-heatmap"], "missing RUN.h5"),
    ],
)
def test_bad_input_is_one_error_line(
    capsys: pytest.CaptureFixture[str],
    runs: dict[str, Path],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    existing = tmp_path / "there.png"
    existing.write_bytes(b"keep")
    paths = {
        **{k: str(v) for k, v in runs.items()},
        "missing": str(tmp_path / "missing.h5"),
        "existing": str(existing),
        "jpg": str(tmp_path / "f.jpg"),
        "md": str(tmp_path / "f.md"),
    }
    argv = [a.format(**paths) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "f.png")]
    status, _, err = gradflow(capsys, "plot", *argv)
    assert status == 2
    assert err.startswith("gradflow: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert existing.read_bytes() == b"keep"


def test_info_shows_overhead_and_health(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path]
) -> None:
    status, out, err = gradflow(capsys, "info", runs["a"])
    assert status == 0, err
    overhead = next(line for line in out.splitlines() if line.startswith("overhead"))
    assert "s wall (4.0 %)" in overhead  # 4 parts x 1e-4 s per step / 0.01 s per step
    assert "long-short" in out
    assert "vanishing update" in out and "down2.1.conv" in out
    assert "non-finite" in out and "up1.0.conv" in out
    status, _, err = gradflow(capsys, "info", runs["text"])
    assert status == 2 and "not an HDF5 file" in err


def test_plot_while_the_run_is_written(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path, out = tmp_path / "live.h5", tmp_path / "live.png"
    with SyntheticRun(path, fcn_layers()) as writer:
        writer.steps(10).epoch().commit()
        assert gradflow(capsys, "plot", "updates-heatmap", path, "-o", out)[0] == 0
        writer.steps(10).epoch().commit()
        status, _, err = gradflow(capsys, "plot", "gradient-heatmap", path, "-o", out, "--force")
        assert status == 0, err


def test_a_real_process_exits_cleanly(runs: dict[str, Path], tmp_path: Path) -> None:
    command = [sys.executable, "-m", "gradflow.cli.main", "plot"]
    ok = subprocess.run(
        [*command, "learning-curves", str(runs["a"]), "-o", str(tmp_path / "c.svg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*command, "learning-curves", str(tmp_path / "none.h5"), "-o", str(tmp_path / "d.svg")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("gradflow: error: ") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("flag, shared", [("--shared-scale", True), ("--per-panel-scale", False)])
def test_shared_scale_flag_reaches_the_figure(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    runs: dict[str, Path],
    tmp_path: Path,
    flag: str,
    shared: bool,
) -> None:
    drawn: list[Figure] = []

    def keep(name: str, opened: Sequence[Run], **options: Any) -> Figure:
        drawn.append(render(name, opened, **options))
        return drawn[-1]

    monkeypatch.setattr(output, "render", keep)
    args = ["updates-heatmap", runs["a"], runs["b"], runs["a"], runs["b"], "--log", flag]
    status, _, err = gradflow(capsys, "plot", *args, "-o", tmp_path / "u.png")
    assert status == 0, err
    norms = [drawn[0].axes[i].collections[0].norm for i in range(4)]
    limits = {(norm.vmin, norm.vmax) for norm in norms}
    assert len(limits) == (1 if shared else 2)  # a and b differ; the two copies agree


def test_without_a_figure_name_the_most_useful_one(
    capsys: pytest.CaptureFixture[str],
    runs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    status, out, err = gradflow(capsys, "plot", runs["a"])
    assert status == 0, err
    assert out.splitlines() == [
        "no figure named: updates-heatmap of epoch/update_abs_mean, log colour (closed epochs: 3)",
        "wrote a-updates-heatmap.png",
    ]
    # The same picture as naming it.
    status, _, err = gradflow(
        capsys, "plot", "updates-heatmap", runs["a"], "--log", "--out", tmp_path / "named.png"
    )
    assert status == 0, err
    assert (tmp_path / "a-updates-heatmap.png").read_bytes() == (
        tmp_path / "named.png"
    ).read_bytes()
    # No closed epoch (in one of the runs): the gradient norms per step.
    status, out, err = gradflow(capsys, "plot", runs["steps"], runs["a"])
    assert status == 0, err
    assert out.splitlines() == [
        "no figure named: gradient-heatmap of param/grad_norm, log colour "
        "(no closed epoch: per step)",
        "wrote steps-a-gradient-heatmap.png",
    ]
    status, out, err = gradflow(capsys, "plot", runs["a"], "--stat", "activation/zero_fraction")
    assert status == 0, err
    assert out.startswith("no figure named: gradient-heatmap of activation/zero_fraction, linear")
    # A second time: the file exists; and a file that is not a run.
    for args, message in [
        ((runs["a"],), "a-updates-heatmap.png: file exists; pass --force"),
        ((runs["text"],), "not an HDF5 file, so not a gradflow run"),
        ((tmp_path / "missing.h5",), "missing.h5: no such run file"),
    ]:
        status, _, err = gradflow(capsys, "plot", *args)
        assert status == 2 and err.startswith("gradflow: error: ") and message in err, err
