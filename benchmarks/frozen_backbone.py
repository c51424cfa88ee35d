"""Per-step cost of recording a model whose backbone is frozen (18 of 20 layers).

Three recorded variants of one 20-layer MLP (256 wide, batch 64, SGD, ``param`` probe,
every step), each timed against the same model without a Recorder, in interleaved pairs
(plain first in even rounds, recorded first in odd ones):

- ``frozen``: 18 of 20 layers frozen, all 20 in the Recorder's layer set;
- ``frozen, layers=``: the same model, only the 2 trainable layers selected
  (``layers=``): what recording costs when the frozen layers are not there at all;
- ``trainable``: every layer trainable, all 20 recorded.

Frozen layers cost nothing per step when ``frozen`` costs what ``frozen, layers=`` does.
Prints, per variant, the median and interquartile range over the pairs of the recorded
minus plain milliseconds per step and of their ratio, the recorder's own milliseconds
per row in the training thread (hooks, reductions, copy: the run file's ``overhead``,
free of the noise of other processes) and the run file's bytes per row.
Usage: ``python benchmarks/frozen_backbone.py [PAIRS] [STEPS]`` (default 15 pairs of
100 steps), from the repository root.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from harness.env import environment, print_header
from harness.report import format_table, summarize
from harness.timing import Rig, paired_trials
from harness.tools import GradflowTool, Tool
from harness.workloads import MLPTrainer
from torch import nn

import gradflow

N_LAYERS = 20
N_FROZEN = 18
WARMUP = 5


def trainer(frozen: int) -> MLPTrainer:
    """The MLP with its first ``frozen`` linear layers frozen."""
    return MLPTrainer(N_LAYERS, width=256, batch=64, relu=True, frozen=frozen, lr=1e-4)


def rigs(
    name: str, frozen: int, path: Path, select: Callable[[str, nn.Module], bool] | None = None
) -> tuple[Rig, Rig, GradflowTool]:
    """The plain model, the recorded one timed against it (after the warm-up steps), and
    its recorder."""
    plain, recorded = trainer(frozen), trainer(frozen)
    tool = GradflowTool(recorded, path, probes=("param",), layers=select)
    pair = (Rig(name, plain, Tool(plain)), Rig(name, recorded, tool))
    for rig in pair:
        rig.run(WARMUP)
        rig.tool.settle()
    return (*pair, tool)


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    torch.set_num_threads(1)
    env = environment()
    print_header(f"frozen backbone: {pairs} pairs of {steps} steps per variant", env)
    trainable = {str(2 * i) for i in range(N_FROZEN, N_LAYERS)}
    with tempfile.TemporaryDirectory() as tmp:
        built = [
            rigs("frozen", N_FROZEN, Path(tmp) / "frozen.h5"),
            rigs(
                "frozen, layers=",
                N_FROZEN,
                Path(tmp) / "selected.h5",
                lambda name, module: name in trainable,
            ),
            rigs("trainable", 0, Path(tmp) / "trainable.h5"),
        ]
        plain = {p.name: p for p, _, _ in built}
        timed = paired_trials(plain, [r for _, r, _ in built], pairs=pairs, steps=steps)
        rows = []
        for _, rig, tool in built:
            tool.close()
            own = tool.self_reported() or {}
            with gradflow.open_run(tool.path) as run:
                layers = run.n_layers
            # The recorder's own time in the training thread (hooks, reductions, copy).
            own_ms = sum(own.get(k, 0.0) for k in ("hooks", "stats", "copy"))
            size = tool.path.stat().st_size
            p = timed[rig.name]
            extra = summarize(1e3 * (v - b) for b, v in zip(p.baseline, p.variant, strict=True))
            ratio = summarize(p.ratios)
            rows.append([
                rig.name, layers, f"{extra.median:.3f}", extra.iqr(), f"{ratio.median:.3f}",
                ratio.iqr(), f"{own_ms:.3f}", f"{size / max(own.get('rows', 1.0), 1.0):.0f}",
            ])  # fmt: skip
    print(
        format_table(
            ["variant", "layers", "extra ms/step", "IQR", "ratio", "IQR", "own ms/row", "B/row"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
