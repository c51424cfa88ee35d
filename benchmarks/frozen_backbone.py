"""Per-step cost of recording a model whose backbone is frozen (18 of 20 layers).

Prints the mean step time with and without a Recorder (param probe, every step) and the
run file's size. Usage: ``python benchmarks/frozen_backbone.py [STEPS]``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradflow


def model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    net = nn.Sequential(*layers)
    for layer in list(net)[: 2 * 18]:  # 90 % of the layers frozen
        layer.requires_grad_(False)
    return net


def run(steps: int, record: bool, path: Path) -> float:
    net = model()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(64, 256), torch.randn(64, 256)
    rec = gradflow.Recorder(net, opt, path, every=1, probes="param") if record else None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    if rec is not None:
        rec.close()
    return sum(times[5:]) / len(times[5:])


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.h5"
        plain = run(steps, False, path)
        recorded = run(steps, True, path)
        size = path.stat().st_size
        with gradflow.open_run(path) as r:
            layers = r.n_layers
    print(f"gradflow {gradflow.__file__}")
    print(
        f"steps {steps}: plain {plain * 1e3:.3f} ms/step, recorded {recorded * 1e3:.3f} ms/step "
        f"({recorded / plain:.3f}x), run file {size / 1e3:.1f} kB "
        f"({size / steps:.0f} B/step), {layers} layers in the file"
    )


if __name__ == "__main__":
    main()
