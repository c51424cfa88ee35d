"""Before/after: the recorder's overhead rows of two code versions, on one machine in one sitting.

Runs ``benchmarks/overhead.py`` of a base revision (a ``git worktree`` outside the
repository, made once and reused) and of the current working tree, alternating in rounds
(base then current in even rounds, current then base in odd ones), every run a separate
subprocess started in that version's own checkout with ``PYTHONPATH`` set to it, so that it
imports that version's gradflow and benchmark helpers. Each run reports, per variant,
the median of its paired ratios ``variant s/step / plain s/step``; the table gives, per
workload and variant, the median over rounds of those per-run medians (min-max over
rounds) for each side, and current/base.

    python benchmarks/compare.py --base 68f1949                 # ~15 min on a quiet 2-core machine
    python benchmarks/compare.py --base 68f1949 --quick         # smoke test, < 2 min
    python benchmarks/compare.py --base v1 --current v2 --json out.json   # two revisions

Workloads are ``MODEL:CROP:BATCH:STEPS:PAIRS`` (steps per trial, pairs per run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.env import REPO, environment, print_header, script_parser, stderr
from harness.report import format_table, summarize, write_json

DEFAULT_WORKLOADS = "fig3b-long-9:96:4:10:3,paper-resunet:64:2:5:3,paper-resunet:256:2:2:2"
QUICK_WORKLOADS = "fig3b-long-9:96:4:2:1,paper-resunet:64:2:2:1,paper-resunet:256:2:1:1"
DEFAULT_ROUNDS = 8
QUICK_ROUNDS = 2

# Run in each checkout before the rounds: which gradflow it imports and its CPU kernels
# (the kernels module moved from gradflow.native to gradflow.kernels.cpu; either is tried).
# Loading the kernels here also builds them into the per-user cache outside any timing.
CHECK = """
import importlib, json, gradflow
backend = None
for name in ("gradflow.native", "gradflow.kernels.cpu"):
    try:
        backend = importlib.import_module(name).cpu_backend()
        break
    except (ImportError, AttributeError):
        continue
print(json.dumps({"file": gradflow.__file__, "kernels": backend}))
"""


@dataclass(frozen=True)
class Load:
    """One overhead.py workload: model, input side, batch, steps per trial, pairs per run."""

    model: str
    crop: int
    batch: int
    steps: int
    pairs: int

    @property
    def name(self) -> str:
        return f"{self.model} {self.crop}px b{self.batch}"

    @classmethod
    def parse(cls, spec: str) -> Load:
        parts = spec.split(":")
        if len(parts) != 5:
            raise ValueError(f"workload {spec!r} is not MODEL:CROP:BATCH:STEPS:PAIRS")
        model, *numbers = parts
        crop, batch, steps, pairs = (int(n) for n in numbers)
        return cls(model, crop, batch, steps, pairs)


@dataclass
class Side:
    """One code version: its label, checkout, commit and what it imports."""

    label: str
    checkout: Path
    commit: str
    dirty: bool
    subject: str
    gradflow_file: str = ""
    kernels: str | None = None


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def worktree(rev: str, root: Path) -> Path:
    """A detached worktree of ``rev`` under ``root`` (reused when it is already there)."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    folder = root / f"gradflow-rev-{sha[:12]}"
    if folder.exists():
        try:
            there = git("rev-parse", "HEAD", cwd=folder)
        except subprocess.CalledProcessError as err:
            sys.exit(f"{folder} exists but is not a git checkout ({err.stderr.strip()})")
        if there != sha:
            sys.exit(f"{folder} is at {there[:12]}, not {sha[:12]}: remove it")
        if git("status", "--porcelain", "--untracked-files=no", cwd=folder):
            sys.exit(f"{folder} has local changes: remove it (git worktree remove --force)")
        stderr(f"reusing worktree {folder}")
    else:
        root.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", str(folder), sha)
        stderr(f"created worktree {folder} at {sha[:12]}")
    return folder


def side_for(label: str, rev: str | None, root: Path) -> Side:
    """The side of ``rev`` (a worktree), or of this repository's working tree if None."""
    if rev is None:
        checkout = REPO
        dirty = bool(
            subprocess.run(
                ["git", "diff-index", "--quiet", "HEAD", "--"], cwd=REPO, timeout=60
            ).returncode
        )
    else:
        checkout, dirty = worktree(rev, root), False
    commit = git("rev-parse", "HEAD", cwd=checkout)
    subject = git("log", "-1", "--format=%s", "HEAD", cwd=checkout)
    return Side(label, checkout, commit, dirty, subject)


def side_env(side: Side) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(side.checkout))
    env.setdefault("MPLBACKEND", "Agg")
    return env


def check_side(side: Side) -> None:
    """Record (and print) which gradflow the side imports and which kernels it loads."""
    proc = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=side.checkout,
        env=side_env(side),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"{side.label}: importing gradflow from {side.checkout} fails: {tail}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    side.gradflow_file, side.kernels = info["file"], info["kernels"]
    if not Path(side.gradflow_file).resolve().is_relative_to(side.checkout.resolve()):
        sys.exit(f"{side.label}: imports {side.gradflow_file}, not the one in {side.checkout}")


def run_overhead(
    side: Side, load: Load, variants: str, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """One overhead.py run of ``side`` on ``load``: per-variant ratio medians and more."""
    out = tmp / "run.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "benchmarks/overhead.py",
        *("--model", load.model, "--crop", str(load.crop), "--batch", str(load.batch)),
        *("--steps-per-trial", str(load.steps), "--pairs", str(load.pairs)),
        *("--warmup", str(args.warmup), "--variants", variants, "--json", str(out)),
    ]
    if not args.memory:
        cmd.append("--no-memory")
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=side.checkout,
            env=side_env(side),
            capture_output=True,
            text=True,
            timeout=args.run_timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.run_timeout} s"}
    seconds = time.monotonic() - started
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}", "seconds": seconds}
    data = json.loads(out.read_text())
    per_variant = {}
    for name, result in data["results"].items():
        if name == "plain":
            continue
        per_variant[name] = {
            "ratio_median": result["ratio"]["median"],
            "ratios": [
                v / b
                for b, v in zip(result["pairs"]["plain"], result["pairs"]["variant"], strict=True)
            ],
            "self_reported_ms": result.get("self_reported_ms"),
            "kernel_backend": result.get("kernel_backend"),
        }
    return {
        "seconds": seconds,
        "git_commit": data["environment"]["git_commit"],
        "plain_s_per_step": data["results"]["plain"]["seconds_per_step"]["median"],
        "variants": per_variant,
        "unavailable": data.get("unavailable", {}),
    }


def summary_cell(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "n/a"
    s = summarize(values)
    return f"{s.median:{fmt}} ({s.lo:{fmt}}-{s.hi:{fmt}})"


def table(
    loads: list[Load], names: list[str], runs: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """The comparison table and its rows as data."""
    rows, data = [], []
    for load in loads:
        for name in names:
            per_side: dict[str, list[float]] = {"base": [], "current": []}
            stats: dict[str, list[float]] = {"base": [], "current": []}
            for run in runs:
                if run["workload"] != load.name or name not in run.get("variants", {}):
                    continue
                v = run["variants"][name]
                per_side[run["side"]].append(v["ratio_median"])
                if v.get("self_reported_ms"):
                    stats[run["side"]].append(v["self_reported_ms"]["stats"])
            base, current = per_side["base"], per_side["current"]
            change = (
                summarize(current).median / summarize(base).median if base and current else None
            )
            rows.append(
                [
                    load.name,
                    name,
                    summary_cell(base),
                    summary_cell(current),
                    "n/a" if change is None else f"{change:.3f}",
                    summary_cell(stats["base"], ".1f"),
                    summary_cell(stats["current"], ".1f"),
                    f"{len(base)}/{len(current)}",
                ]
            )
            data.append(
                {
                    "workload": load.name,
                    "variant": name,
                    "base": summarize(base).as_dict(),
                    "current": summarize(current).as_dict(),
                    "current_over_base": change,
                    "stats_ms_base": summarize(stats["base"]).as_dict(),
                    "stats_ms_current": summarize(stats["current"]).as_dict(),
                }
            )
    headers = [
        "workload",
        "variant",
        "base ratio",
        "current ratio",
        "current/base",
        "base stats ms",
        "current stats ms",
        "runs",
    ]
    return format_table(headers, rows), data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--base", required=True, help="the base revision (any git revision)")
    p.add_argument(
        "--current", help="a revision to compare instead of the working tree (default: it)"
    )
    p.add_argument(
        "--worktrees",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where revisions are checked out, as gradflow-rev-<sha> (default: the temp dir)",
    )
    p.add_argument("--workloads", help=f"MODEL:CROP:BATCH:STEPS:PAIRS,... ({DEFAULT_WORKLOADS})")
    p.add_argument("--variants", default="param,all", help="overhead.py variants (param,all)")
    p.add_argument("--rounds", type=int, help=f"rounds (default {DEFAULT_ROUNDS})")
    p.add_argument("--pairs", type=int, help="pairs per run, for every workload")
    p.add_argument("--steps", type=int, help="steps per trial, for every workload")
    p.add_argument("--warmup", type=int, help="untimed steps per variant (default 3, quick 1)")
    p.add_argument("--memory", action="store_true", help="also overhead.py's peak-RSS runs")
    p.add_argument("--run-timeout", type=int, default=900, help="seconds per overhead.py run")
    p.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK_ROUNDS} rounds of 1 short pair"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = args.workloads or (QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
    try:
        loads = [Load.parse(s) for s in spec.split(",") if s]
    except ValueError as err:
        sys.exit(str(err))
    loads = [
        Load(
            w.model,
            w.crop,
            w.batch,
            args.steps or w.steps,
            args.pairs or w.pairs,
        )
        for w in loads
    ]
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    names = [n for n in args.variants.split(",") if n and n != "plain"]

    try:
        sides = [
            side_for("base", args.base, args.worktrees),
            side_for("current", args.current, args.worktrees),
        ]
    except subprocess.CalledProcessError as err:
        sys.exit(f"git {' '.join(err.cmd[1:])}: {err.stderr.strip()}")
    for side in sides:
        check_side(side)

    env = environment()
    print_header("gradflow before/after: overhead.py ratios of two code versions", env)
    for side in sides:
        changes = " + uncommitted changes" if side.dirty else ""
        print(f"{side.label:8} {side.commit[:12]}{changes}  {side.subject[:70]}")
        print(f"         gradflow {side.gradflow_file}, {side.kernels} kernels")
    print(f"command  {' '.join(sys.argv)}")
    print(
        f"method   {rounds} rounds (base, current; then current, base; ...), each run "
        f"overhead.py --variants {','.join(names)} --warmup {args.warmup}"
        + ("" if args.memory else " --no-memory")
        + " in a fresh process"
    )
    for load in loads:
        print(f"         {load.name}: {load.pairs} pairs x {load.steps} steps per run")
    print()

    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gradflow-compare-") as tmp:
        for i in range(rounds):
            order = sides if i % 2 == 0 else sides[::-1]
            for load in loads:
                for side in order:
                    result = run_overhead(side, load, ",".join(names), args, Path(tmp))
                    runs.append({"round": i, "side": side.label, "workload": load.name, **result})
                    if "error" in result:
                        stderr(
                            f"round {i + 1}/{rounds} {load.name} {side.label}: {result['error']}"
                        )
                        continue
                    medians = "  ".join(
                        f"{n} {v['ratio_median']:.3f}" for n, v in result["variants"].items()
                    )
                    stderr(
                        f"round {i + 1}/{rounds} {load.name} {side.label}: {medians} "
                        f"({result['seconds']:.0f} s)"
                    )
    total_s = time.monotonic() - started

    text, rows = table(loads, names, runs)
    print(text)
    print(
        "ratio: median over runs of each run's median (variant s/step) / (plain s/step), "
        "min-max over runs in brackets;\ncurrent/base: ratio of those medians; stats ms: the "
        "recorder's own clock of its statistics per recorded step, median over runs."
    )
    backends = sorted(
        {
            f"{r['side']} {v['kernel_backend']}"
            for r in runs
            for v in r.get("variants", {}).values()
            if v.get("kernel_backend")
        }
    )
    commits = sorted({f"{r['side']} {r['git_commit']}" for r in runs if "git_commit" in r})
    print(f"kernels in the run files: {', '.join(backends) or 'n/a'}")
    print(f"commits the runs reported: {', '.join(commits) or 'n/a'}")
    failed = [r for r in runs if "error" in r]
    if failed:
        print(f"failed runs: {len(failed)} of {len(runs)} (see the JSON for the reasons)")
    print(f"took {total_s / 60:.1f} min")
    write_json(
        args.json,
        {
            "environment": env,
            "sides": sides,
            "method": {
                "rounds": rounds,
                "variants": names,
                "warmup": args.warmup,
                "memory": args.memory,
                "workloads": loads,
            },
            "table": rows,
            "runs": runs,
            "seconds": total_s,
        },
    )


if __name__ == "__main__":
    main()
