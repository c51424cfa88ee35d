"""What the call probes cost per layer call, on a stack of tiny layers where a call's cost
is all hook and no arithmetic.

A ``--layers``-layer MLP of 8 x 8 Linear layers (batch 4) is trained by SGD with four
Recorders side by side: none, ``param``, ``param`` + ``activation``, all three default probes.
The training thread's CPU time of each step is taken (the writer thread runs beside it on
its own core), the variants interleaved step by step, and the minimum over ``--steps``
steps kept: preemption on a busy machine only adds time, so the minimum is the cost. The
per-call costs are the differences of those minima divided by the number of layers (one
call each per forward and per backward).

    python benchmarks/call_cost.py
    PYTHONPATH=/other/checkout python benchmarks/call_cost.py   # another version's gradflow
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from harness.env import environment, print_header, script_parser
from harness.report import write_json
from torch import nn

import gradflow
from gradflow import Recorder

VARIANTS: dict[str, tuple[str, ...] | None] = {
    "plain": None,
    "param": ("param",),
    "activation": ("param", "activation"),
    "all": ("param", "activation", "grad_output"),
}
WARMUP = 5


def step_seconds(layers: int, steps: int, folder: Path) -> dict[str, float]:
    """The fewest training-thread CPU seconds of one step, per variant."""
    x = torch.randn(4, 8)
    setups = []
    for name, probes in VARIANTS.items():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        rec = None
        if probes is not None:
            rec = Recorder(model, opt, folder / f"{name}.h5", probes=probes, overwrite=True)
        setups.append((name, model, opt, rec))
    best = dict.fromkeys(VARIANTS, float("inf"))
    for i in range(WARMUP + steps):
        for name, model, opt, rec in setups:
            t0 = time.thread_time()
            opt.zero_grad(set_to_none=True)
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            if rec is not None:
                rec.log(loss=loss)
            if i >= WARMUP:
                best[name] = min(best[name], time.thread_time() - t0)
    for *_, rec in setups:
        if rec is not None:
            rec.close()
    return best


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--layers", type=int, default=200, help="Linear layers (200)")
    p.add_argument("--steps", type=int, default=300, help="timed steps per variant (300)")
    args = p.parse_args()
    torch.set_num_threads(1)
    env = environment()
    print_header("gradflow: the call probes' cost per layer call", env)
    print(f"gradflow imported from {Path(gradflow.__file__).parent}")
    with tempfile.TemporaryDirectory() as folder:
        best = step_seconds(args.layers, args.steps, Path(folder))
    n = args.layers
    per_call = {
        "param": (best["param"] - best["plain"]) / n,
        "activation": (best["activation"] - best["param"]) / n,
        "grad_output": (best["all"] - best["activation"]) / n,
    }
    print("step, training thread's CPU time (fewest over steps): " + ", ".join(
        f"{k} {1e3 * v:.2f} ms" for k, v in best.items()
    ))  # fmt: skip
    print("per layer: " + ", ".join(f"{k} {1e6 * v:.1f} us" for k, v in per_call.items()))
    write_json(args.json, {"env": env, "step_seconds": best, "per_layer_seconds": per_call})


if __name__ == "__main__":
    main()
