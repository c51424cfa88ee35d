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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness.env import environment, print_header
from harness.report import format_table, summarize
from torch import nn

import gradflow

N_LAYERS = 20
N_FROZEN = 18
WARMUP = 5


def model(frozen: int) -> nn.Sequential:
    """The MLP with its first ``frozen`` linear layers frozen."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(N_LAYERS):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    net = nn.Sequential(*layers)
    for layer in list(net)[: 2 * frozen]:
        layer.requires_grad_(False)
    return net


@dataclass
class Trainer:
    """One model and its optimizer, training on one fixed batch."""

    net: nn.Sequential
    opt: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.opt = torch.optim.SGD([p for p in self.net.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 256, generator=gen)
        self.y = torch.randn(64, 256, generator=gen)

    def seconds_per_step(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad()
            nn.functional.mse_loss(self.net(self.x), self.y).backward()
            self.opt.step()
        return (time.perf_counter() - start) / steps


@dataclass
class Variant:
    """A recorded trainer and the plain trainer of the same model it is timed against."""

    name: str
    plain: Trainer
    recorded: Trainer
    recorder: gradflow.Recorder
    extra_ms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def variant(
    name: str, frozen: int, path: Path, select: Callable[[str, nn.Module], bool] | None = None
) -> Variant:
    recorded = Trainer(model(frozen))
    rec = gradflow.Recorder(
        recorded.net, recorded.opt, path, every=1, probes="param", layers=select
    )
    return Variant(name, Trainer(model(frozen)), recorded, rec)


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    torch.set_num_threads(1)
    env = environment()
    print_header(f"frozen backbone: {pairs} pairs of {steps} steps per variant", env)
    trainable = {str(2 * i) for i in range(N_FROZEN, N_LAYERS)}
    with tempfile.TemporaryDirectory() as tmp:
        variants = [
            variant("frozen", N_FROZEN, Path(tmp) / "frozen.h5"),
            variant(
                "frozen, layers=",
                N_FROZEN,
                Path(tmp) / "selected.h5",
                lambda name, module: name in trainable,
            ),
            variant("trainable", 0, Path(tmp) / "trainable.h5"),
        ]
        for v in variants:
            v.plain.seconds_per_step(WARMUP)
            v.recorded.seconds_per_step(WARMUP)
        for i in range(pairs):
            for v in variants[i % 3 :] + variants[: i % 3]:
                order = (v.plain, v.recorded) if i % 2 == 0 else (v.recorded, v.plain)
                times = {id(t): t.seconds_per_step(steps) for t in order}
                plain, recorded = times[id(v.plain)], times[id(v.recorded)]
                v.extra_ms.append((recorded - plain) * 1e3)
                v.ratios.append(recorded / plain)
        rows = []
        for v in variants:
            v.recorder.close()
            with gradflow.open_run(v.recorder.path) as run:
                layers, n_rows = run.n_layers, run.n_steps
                parts = run.overhead
            # The recorder's own time in the training thread (hooks, reductions, copy).
            own_ms = sum(parts[k] for k in ("hooks", "stats", "copy")) / n_rows * 1e3
            size = v.recorder.path.stat().st_size
            extra, ratio = summarize(v.extra_ms), summarize(v.ratios)
            rows.append([
                v.name, layers, f"{extra.median:.3f}", extra.iqr(), f"{ratio.median:.3f}",
                ratio.iqr(), f"{own_ms:.3f}", f"{size / n_rows:.0f}",
            ])  # fmt: skip
    print(
        format_table(
            ["variant", "layers", "extra ms/step", "IQR", "ratio", "IQR", "own ms/row", "B/row"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
