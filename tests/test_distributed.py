"""The recorder under torch.distributed (gloo, 2 CPU processes launched by torchrun).

Gradients are measured after the all-reduce, so DDP and FSDP2 runs must record the same
per-layer gradient and update norms as one process on the same global batch (rtol 1e-5).
Only the writing rank (0) creates a file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradflow import open_run

SCRIPT = Path(__file__).parent / "scripts" / "distributed_train.py"


def _run(mode: str, path: Path, nproc: int) -> None:
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), mode, str(path)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(SCRIPT),
            mode,
            str(path),
        ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "single.h5"
    _run("single", path, 1)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_equals_single_process(mode: str, single: Path, tmp_path: Path) -> None:
    path = tmp_path / f"{mode}.h5"
    _run(mode, path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{mode}.h5"]  # one file, rank 0's
    with open_run(single) as ref, open_run(path) as run:
        assert run.layer_names == ref.layer_names
        assert run.attrs["world_size"] == 2 and run.attrs["activation_scope"] == "all ranks"
        for stat in (
            "grad_norm",
            "update_norm",
            "weight_norm",
            "update_abs_mean",
            "update_abs_max",
            "grad_update_cos",
        ):
            np.testing.assert_allclose(
                run.stat("param", stat), ref.stat("param", stat), rtol=1e-5, err_msg=stat
            )
        np.testing.assert_allclose(
            run.stat("epoch", "update_abs_mean"), ref.stat("epoch", "update_abs_mean"), rtol=1e-5
        )
        # activations reduced over ranks cover the global batch
        np.testing.assert_allclose(
            run.stat("activation", "mean"), ref.stat("activation", "mean"), rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            run.stat("activation", "std"), ref.stat("activation", "std"), rtol=1e-4
        )
