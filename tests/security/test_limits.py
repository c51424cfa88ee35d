"""Limits that hold on crafted text: the attribute limit on the text of variable-length
strings, and ``gradflow info`` on 15 MB of words in linear time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import pytest
from runfiles import write_run

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
