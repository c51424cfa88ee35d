"""Limits that hold on crafted text: the attribute limit on the text of variable-length
strings, and ``gradflow info`` on 15 MB of words in linear time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import pytest
from runfiles import SyntheticRun, conv_stack, write_run

from gradflow.cli.main import main
from gradflow.errors import GradflowError
from gradflow.runfile import open_run


def test_a_20_mb_config_is_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=2)
    with h5py.File(run, "a") as f:
        f.attrs["config"] = json.dumps({"a": "x" * (20 * 2**20)})
    with pytest.raises(GradflowError, match="attribute 'config' is too large"):
        open_run(run)


@pytest.mark.parametrize("where", ["device", "config key"])
def test_info_prints_15_mb_of_words_within_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    run = write_run(tmp_path / "run.h5", epochs=1, steps_per_epoch=2)
    words = "word " * (3 * 10**6)
    with h5py.File(run, "a") as f:
        if where == "device":
            f.attrs["device"] = words
        else:
            f.attrs["config"] = json.dumps({words: 1})
    start = time.perf_counter()
    with pytest.raises(SystemExit) as done:
        main(["info", str(run)])
    assert done.value.code == 0
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"gradflow info took {elapsed:.1f} s"
    assert "word word" in capsys.readouterr().out


def _many_layers(path: Path, n_layers: int) -> Path:
    """A run of ``n_layers`` conv layers, 2 steps and an epoch: what ``info`` checks."""
    stats = {
        "param": ["update_ratio", "grad_nonfinite", "update_norm"],
        "activation": ["zero_fraction"],
    }
    run = SyntheticRun(path, conv_stack(n_layers), steps_per_epoch=2, step_stats=stats,
                       epoch_stats=["update_ratio"])  # fmt: skip
    run.steps(2).epoch().close(compact=False)
    return path


def _info_seconds(path: Path, capsys: pytest.CaptureFixture[str]) -> float:
    start = time.perf_counter()
    with pytest.raises(SystemExit) as done:
        main(["info", str(path)])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert done.value.code == 0 and f"layers         {path.stem[1:]} (conv" in out, out[:2000]
    return elapsed


def test_info_is_linear_in_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """10 times the layers take less than 30 times as long (the health check compared
    every layer with every other: 10^5 layers took minutes), and 10^5 layers under 60 s."""
    small = _info_seconds(_many_layers(tmp_path / "L10000.h5", 10**4), capsys)
    large = _info_seconds(_many_layers(tmp_path / "L100000.h5", 10**5), capsys)
    print(f"\ngradflow info: 10^4 layers {small:.2f} s, 10^5 layers {large:.2f} s")
    assert large < 30 * small and large < 60, (small, large)
