"""Start-up time of the ``gradflow`` command: wall time of whole processes, like hyperfine.

Runs each command ``--runs`` times (after one warm-up run that fills the OS file cache) and
prints the median and the fastest wall time, next to ``python -c pass`` and ``import torch``
for scale, and the load average. On a busy machine wall times mostly measure the wait for a
CPU, so the median CPU time (user + system) of the process is printed too: a start-up is
one thread, and on a quiet machine its wall time is close to its CPU time. Targets:
``gradflow --help`` under 0.5 s and ``gradflow info`` under 1 s. Run:
``python benchmarks/startup.py [--runs 10]``.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from harness.env import environment, print_header, script_parser
from runfiles import write_run

TARGETS_S = {"gradflow --help": 0.5, "gradflow info RUN": 1.0}


def gradflow_command() -> list[str]:
    """The installed console script, else the module."""
    script = Path(sys.executable).with_name("gradflow")
    found = script if script.exists() else shutil.which("gradflow")
    return [str(found)] if found else [sys.executable, "-m", "gradflow.cli.main"]


def seconds(argv: list[str], runs: int) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of ``runs`` runs of ``argv`` (after one warm-up run)."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    wall, cpu = [], []
    for i in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if i:
            wall.append(time.perf_counter() - start)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = script_parser(__doc__, json_help=None)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    print_header("gradflow start-up: wall time of whole processes", environment())
    gradflow = gradflow_command()
    with tempfile.TemporaryDirectory(prefix="gradflow-startup-") as tmp:
        run = write_run(Path(tmp) / "run.h5", epochs=4, steps_per_epoch=50)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "gradflow --help": [*gradflow, "--help"],
            "gradflow info RUN": [*gradflow, "info", str(run)],
            "gradflow plot updates-heatmap RUN": [
                *gradflow,
                "plot",
                "updates-heatmap",
                str(run),
                "-o",
                f"{tmp}/u.png",
                "--force",
            ],
        }
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{args.runs} runs each, {os.cpu_count()} CPUs, load average {load}")
        print(f"{'command':<36} {'median s':>9} {'min s':>7} {'CPU s':>7}  target (median)")
        failed = []
        for name, argv in commands.items():
            times, cpu = seconds(argv, args.runs)
            median = statistics.median(times)
            target = TARGETS_S.get(name)
            verdict = ""
            if target is not None:
                verdict = f"< {target} s: {'yes' if median < target else 'NO'}"
                if median >= target:
                    failed.append(name)
            cpu_s = statistics.median(cpu)
            print(f"{name:<36} {median:>9.3f} {min(times):>7.3f} {cpu_s:>7.3f}  {verdict}")
    if failed:
        print(f"over target: {', '.join(failed)}")


if __name__ == "__main__":
    main()
