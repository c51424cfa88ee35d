"""Soak test: 10 000 recorded steps of a small MLP; memory, hooks and file growth over time.

A ``--layers``-layer MLP (Linear + ReLU, width ``--width``, batch ``--batch``, SGD) trains
on one fixed random batch with a :class:`gradflow.Recorder` recording every step with all
probes, closing an epoch every ``--epoch-every`` steps. Every ``--sample-every`` steps it
samples the resident memory, the hooks on the model, its parameters and the optimizer,
threads, open files, and the run file's size. Goals: resident memory grows by less than
50 MB after the first sample, the hook count never changes (and drops back to the plain
count after ``close()``), and the file grows linearly (bytes per step of the second half
within 25 % of the first half's).

    python benchmarks/soak.py                   # 10 000 steps, about a minute
    python benchmarks/soak.py --steps 2000      # a quick smoke test
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness.env import environment, print_header, script_parser
from harness.process import count_hooks, current_rss_mb, dataset_bytes
from harness.report import format_table, write_json
from harness.tools import GradflowTool, Tool
from harness.workloads import MLPTrainer

from gradflow.names import DEFAULT_PROBES
from gradflow.runfile import open_run

RSS_GOAL_MB = 50.0
LINEAR_TOLERANCE = 0.25


def open_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def sample(step: int, trainer: MLPTrainer, path: Path, started: float) -> dict[str, Any]:
    gc.collect()
    return {
        "step": step,
        "seconds": time.perf_counter() - started,
        "rss_mb": current_rss_mb(),
        "hooks": count_hooks(trainer.model, trainer.optimizer),
        "threads": threading.active_count(),
        "open_files": open_files(),
        "file_bytes": path.stat().st_size if path.exists() else 0,
    }


def main() -> None:
    p = script_parser(__doc__)
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--epoch-every", type=int, default=1000)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--probes", default=",".join(DEFAULT_PROBES))
    args = p.parse_args()
    env = environment()
    print_header("gradflow soak: memory, hooks and file growth over a long run", env)
    probes = tuple(args.probes.split(","))
    trainer = MLPTrainer(args.layers, width=args.width, batch=args.batch, relu=True)
    print(
        f"workload: {args.layers}-layer MLP, width {args.width}, batch {args.batch}, SGD; "
        f"recorder every step, probes {','.join(probes)}, epoch every {args.epoch_every} steps"
    )
    plain = Tool(trainer)
    for _ in range(5):
        trainer.step(plain)
    hooks_plain = count_hooks(trainer.model, trainer.optimizer)

    with tempfile.TemporaryDirectory(prefix="gradflow-soak-") as tmp:
        path = Path(tmp) / "soak.h5"
        started = time.perf_counter()
        tool = GradflowTool(trainer, path, every=1, probes=probes)
        trainer.step(tool)  # the first step fixes the layout and creates the file
        tool.settle()
        samples = [sample(1, trainer, path, started)]
        for step in range(2, args.steps + 1):
            trainer.step(tool)
            if step % args.epoch_every == 0:
                tool.recorder.epoch_end()
            if step % args.sample_every == 0 or step == args.steps:
                samples.append(sample(step, trainer, path, started))
        tool.close()
        elapsed = time.perf_counter() - started
        hooks_after = count_hooks(trainer.model, trainer.optimizer)
        final_bytes = path.stat().st_size
        data_bytes = sum(dataset_bytes(path).values())
        with open_run(path) as run:
            rows = run.n_steps
            epochs = run.n_epochs

    print(
        format_table(
            ["step", "s", "RSS MB", "hooks", "threads", "files", "file MB"],
            [
                [
                    s["step"],
                    f"{s['seconds']:.1f}",
                    f"{s['rss_mb']:.1f}",
                    s["hooks"],
                    s["threads"],
                    s["open_files"],
                    f"{s['file_bytes'] / 1e6:.2f}",
                ]
                for s in samples
            ],
        )
    )
    first = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    rss_growth = last["rss_mb"] - first["rss_mb"]
    recorded_hooks = {s["hooks"] for s in samples[1:]}
    mid = min(samples, key=lambda s: abs(s["step"] - args.steps / 2))
    rate_1 = (mid["file_bytes"] - samples[0]["file_bytes"]) / max(mid["step"] - 1, 1)
    rate_2 = (last["file_bytes"] - mid["file_bytes"]) / max(last["step"] - mid["step"], 1)
    growth = rate_2 / rate_1 if rate_1 > 0 else float("nan")
    checks = {
        "rss": rss_growth < RSS_GOAL_MB,
        "hooks_constant": len(recorded_hooks) == 1,
        "hooks_removed": hooks_after == hooks_plain,
        "file_linear": abs(growth - 1) <= LINEAR_TOLERANCE,
        "all_rows": rows == args.steps,
    }
    print(
        f"\n{args.steps} steps in {elapsed:.0f} s ({args.steps / elapsed:.0f} steps/s); "
        f"{rows} rows and {epochs} epochs in the file, {final_bytes / 1e6:.2f} MB after close "
        f"({final_bytes / max(rows, 1):.0f} B/row); its datasets hold {data_bytes / 1e6:.2f} MB, "
        f"the other {100 * (1 - data_bytes / final_bytes):.0f} % is space HDF5 did not reuse"
    )
    print(
        f"RSS {first['rss_mb']:.1f} MB at step {first['step']} -> {last['rss_mb']:.1f} MB "
        f"at step {last['step']}; hooks: {hooks_plain} plain, {sorted(recorded_hooks)} while "
        f"recording, {hooks_after} after close"
    )
    print(f"file growth: {rate_1:.0f} B/step up to step {mid['step']}, {rate_2:.0f} B/step after")
    failed = [name for name, ok in checks.items() if not ok]
    verdict = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
    headline = (
        f"soak: {args.steps} recorded steps ({args.layers}-layer MLP, {'+'.join(probes)}): "
        f"RSS {rss_growth:+.1f} MB after step {first['step']} (goal < {RSS_GOAL_MB:.0f} MB), "
        f"hooks {'constant' if checks['hooks_constant'] else 'CHANGING'} at "
        f"{'/'.join(map(str, sorted(recorded_hooks)))} ({hooks_after - hooks_plain:+d} after "
        f"close), file {rate_1:.0f} then {rate_2:.0f} B/step (x{growth:.2f}): {verdict}"
    )
    write_json(
        args.json,
        {
            "environment": env,
            "args": vars(args),
            "samples": samples,
            "checks": checks,
            "rss_growth_mb": rss_growth,
            "file_bytes": final_bytes,
            "dataset_bytes": data_bytes,
            "bytes_per_step": [rate_1, rate_2],
            "headline": headline,
        },
    )
    print()
    print(headline)


if __name__ == "__main__":
    main()
