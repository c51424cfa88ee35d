"""Records a tiny conv net with gradflow.Recorder: ``python tiny_run.py RUN.h5 STEPS PAUSE``.

Every step is recorded and flushed at once (``flush_every=1``), so a reader sees the run
grow; PAUSE seconds between steps keep it growing while a test watches.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

import gradflow

STEPS_PER_EPOCH = 5


class Tiny(nn.Module):
    """Three named stages of small convolutions and a 1x1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.middle = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.middle(self.down(x))))


def record(path: Path, steps: int, pause: float = 0.0, lr: float = 0.05) -> None:
    """Train ``steps`` SGD steps on a fixed random batch, closing an epoch every 5 steps."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    with gradflow.Recorder(
        model, optimizer, path, every=1, flush_every=1, config={"model": "tiny"}, overwrite=True
    ) as rec:
        for step in range(steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            rec.log(loss=loss)
            if (step + 1) % STEPS_PER_EPOCH == 0:
                rec.epoch_end(val_loss=1.1 * float(loss.detach()))
            time.sleep(pause)


if __name__ == "__main__":
    torch.set_num_threads(1)
    record(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
