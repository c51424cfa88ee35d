"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from runfiles import write_slices
from sweeps import write_ablation

from gradflow.em.data import load_dataset
from gradflow.kernels import prehook


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread, as in the subprocesses the tests start (OMP_NUM_THREADS=1): the
    same numbers, and on the shared 2-core test machine two threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The cache of every test (and of the processes it starts: synthetic volumes, built
    kernels and hooks) in a temporary folder, never the user's. The C++ output-gradient
    hooks are built into it first, so that every recording takes the same path from its
    first step (a build in the background would switch paths at some step)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("gradflow-cache")))
        prehook.squares_sink(wait=True)
        yield


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-seed",
        type=int,
        default=0,
        help="Seed of the damaged run files in tests/test_security.py (default 0).",
    )


@pytest.fixture(scope="module")
def em(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 labelled 64 px slices in the ISBI layout (from the synthetic generator)."""
    volume = load_dataset("synthetic", n_synthetic=7, synthetic_size=64)
    images = (volume.images - volume.images.min()) / np.ptp(volume.images) * 255
    return write_slices(tmp_path_factory.mktemp("em"), images, (1 - volume.labels) * 255)


@pytest.fixture(scope="session")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 40 synthetic run files: 2 models x 2 optimizers x 10 seeds
    (:mod:`sweeps`)."""
    folder = tmp_path_factory.mktemp("ablation")
    write_ablation(folder)
    return folder
