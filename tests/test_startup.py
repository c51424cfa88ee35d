"""The commands that only read run files start without importing torch, and ``--help`` and
``info`` without matplotlib (a test of imports, not of time: ``benchmarks/startup.py``
measures the time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from runfiles import write_run

from gradflow.cli import commands  # noqa: F401  (registers every command on the app)
from gradflow.cli.app import app

# Runs the command line in a fresh interpreter and fails (exit 3) when one of the packages
# named in GRADFLOW_TEST_FORBIDDEN was imported.
WRAPPER = """
import os, sys
from gradflow.cli.main import main
try:
    main(sys.argv[1:])
finally:
    forbidden = os.environ["GRADFLOW_TEST_FORBIDDEN"].split(",")
    heavy = sorted({m.partition(".")[0] for m in sys.modules} & set(forbidden))
    if heavy:
        print(f"imported {', '.join(heavy)}", file=sys.stderr)
        sys.exit(3)
"""

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands if c.callback)


def gradflow(*args: object, forbidden: str = "torch") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    env["GRADFLOW_TEST_FORBIDDEN"] = forbidden
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def run_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("startup") / "a.h5", epochs=2, steps_per_epoch=5)


def test_the_wrapper_sees_torch() -> None:
    """The check itself can fail: ``gradflow models`` needs torch and is reported."""
    result = gradflow("models")
    assert result.returncode == 3 and "imported torch" in result.stderr


def test_help_does_not_import_torch_matplotlib_or_h5py() -> None:
    result = gradflow("--help", forbidden="torch,matplotlib,h5py")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_does_not_import_torch(command: str) -> None:
    result = gradflow(command, "--help")
    assert result.returncode == 0, result.stderr


def test_info_does_not_import_torch_or_matplotlib(run_file: Path) -> None:
    result = gradflow("info", run_file, forbidden="torch,matplotlib")
    assert result.returncode == 0, result.stderr
    assert "a.h5" in result.stdout


def test_plot_does_not_import_torch(run_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "updates.png"
    result = gradflow("plot", "updates-heatmap", run_file, "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG")


def test_report_does_not_import_torch(run_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = gradflow("report", run_file, "--out", out)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_import_gradflow_is_lazy() -> None:
    code = (
        "import sys, gradflow\n"
        "assert 'torch' not in sys.modules, 'import gradflow imported torch'\n"
        "from gradflow import Recorder, Run, open_run, every, log_spaced\n"
        "assert 'torch' in sys.modules and gradflow.Recorder is Recorder\n"
        "assert Recorder.__module__ == 'gradflow.recorder.facade'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unknown_attribute_is_an_attribute_error() -> None:
    import gradflow

    with pytest.raises(AttributeError, match="no attribute 'Recoder'"):
        gradflow.Recoder  # noqa: B018


def test_dir_lists_the_public_api_alone() -> None:
    # In a fresh interpreter, after the lazy names and some submodules have loaded.
    code = (
        "import gradflow, gradflow.runfile\n"
        "gradflow.Run\n"
        "print(' '.join(dir(gradflow)))\n"
        "print(' '.join(gradflow.__all__))\n"
        "print(all(getattr(gradflow, name) is not None for name in gradflow.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed, public, resolved = result.stdout.splitlines()
    assert listed.split() == sorted(public.split())
    assert {"Recorder", "open_run", "Run", "GradflowError"} <= set(listed.split())
    assert resolved == "True"


def test_loss_names_match_the_registry() -> None:
    from gradflow.em.config import LOSS_NAMES
    from gradflow.em.metrics import LOSSES

    assert list(LOSS_NAMES) == LOSSES.names()
