"""An overhead budget as a user meets it: whole training runs, each in a fresh process,
plain and under ``budget=`` alternating.

Each run is one process training ``--steps`` steps alone (after 3 untimed ones), then
closing the Recorder. Per budget, the ratio of each budgeted run's training time to the
plain run next to it, and of its training plus ``close()`` (the writer's last rows, and
compacting the file: a fixed cost per run that no budget can schedule); median and min-max
over ``--rounds`` rounds, the rows recorded and the share the Recorder reports
(``budget_reached``). Separate processes differ by more than a few per cent on a noisy
machine (identical plain runs here: up to 30 %); overhead.py's interleaved pairs are the
sharper measure, this one the whole-run check.

    python benchmarks/budget_runs.py --model fig3b-long-9 --budgets 0.05 --steps 150 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness.env import environment, print_header, script_parser
from harness.report import format_table, summarize, write_json
from harness.tools import GradflowTool, Tool
from harness.workloads import Workload

from gradflow import open_run
from gradflow.names import DEFAULT_PROBES

MODEL_DEFAULTS = {"fig3b-long-9": (96, 4), "paper-resunet": (64, 2), "resnet18": (64, 4)}


def one_run(model: str, budget: float | None, steps: int, folder: Path) -> dict[str, float]:
    """Train ``steps`` steps (after 3 untimed ones) in this process; wall seconds, rows."""
    from harness.workloads import Trainer

    torch.set_num_threads(1)
    crop, batch = MODEL_DEFAULTS.get(model, (64, 4))
    trainer = Trainer(Workload(model=model, crop=crop, batch=batch))
    path = folder / "run.h5"
    tool: Tool = Tool(trainer)
    if budget is not None:
        tool = GradflowTool(trainer, path, every=None, probes=DEFAULT_PROBES, budget=budget)
    for _ in range(3):
        trainer.step(Tool(trainer))
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step(tool)
    t1 = time.perf_counter()
    tool.close()
    out = {"seconds": t1 - t0, "close": time.perf_counter() - t1}
    if budget is not None:
        with open_run(path) as run:
            out["rows"] = float(run.n_steps)
            out["reached"] = float(run.attrs.get("budget_reached", float("nan")))
    return out


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--model", default="fig3b-long-9")
    p.add_argument("--budgets", default="0.01,0.05", help="comma-separated (0.01,0.05)")
    p.add_argument("--steps", type=int, default=150, help="timed steps per run (150)")
    p.add_argument("--rounds", type=int, default=2, help="plain/budgeted rounds (2)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one run, in a fresh process
    args = p.parse_args()
    if args.child is not None:
        budget = None if args.child == "plain" else float(args.child)
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(one_run(args.model, budget, args.steps, Path(folder))))
        return
    env = environment()
    print_header("gradflow: an overhead budget over whole runs", env)
    budgets = [float(b) for b in args.budgets.split(",")]
    ratios: dict[float, list[float]] = {b: [] for b in budgets}
    closed: dict[float, list[float]] = {b: [] for b in budgets}  # training + close()
    rows: dict[float, list[float]] = {b: [] for b in budgets}
    reached: dict[float, list[float]] = {b: [] for b in budgets}

    def run(kind: str) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps)]
        done = subprocess.run([*cmd, "--child", kind], capture_output=True, text=True, check=True)
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    for r in range(args.rounds):
        for budget in budgets:
            kinds = ["plain", str(budget)] if r % 2 == 0 else [str(budget), "plain"]
            results = {kind: run(kind) for kind in kinds}
            got = results[str(budget)]
            plain = results["plain"]["seconds"]
            ratios[budget].append(got["seconds"] / plain)
            closed[budget].append((got["seconds"] + got["close"]) / plain)
            rows[budget].append(got["rows"])
            reached[budget].append(got["reached"])
            print(f"round {r + 1}: budget {budget}: {ratios[budget][-1]:.3f}", file=sys.stderr)
    table = []
    for budget in budgets:
        s, c = summarize(ratios[budget]), summarize(closed[budget])
        table.append([
            f"{budget:g}", f"{s.median:.3f}", s.spread(), f"{c.median:.3f}", c.spread(),
            f"{summarize(rows[budget]).median:.0f}", f"{summarize(reached[budget]).median:.3f}",
        ])  # fmt: skip
    print(f"workload: {args.model}, {args.steps} steps per run, {args.rounds} rounds")
    headers = [
        "budget", "training / plain", "min-max", "+ close() / plain", "min-max", "rows",
        "budget_reached",
    ]  # fmt: skip
    print(format_table(headers, table))
    write_json(
        args.json,
        {"env": env, "ratios": ratios, "with_close": closed, "rows": rows, "reached": reached},
    )


if __name__ == "__main__":
    main()
