"""Where and what ran: the header of every result, and the options every script takes."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The checked-out commit, ``+dirty`` when tracked files differ (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        # Plumbing only: diff-index neither refreshes nor writes the index.
        dirty = subprocess.run(
            ["git", "diff-index", "--quiet", "HEAD", "--"], cwd=REPO, timeout=10
        ).returncode
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
    """Date, machine, versions and commit, for the header and the JSON results."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    env: dict[str, Any] = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
    try:
        load = os.getloadavg()
        env["loadavg_1m"] = round(load[0], 2)
    except OSError:
        pass
    try:  # gradflow versions before the C++ hooks (PYTHONPATH, compare.py) have none
        from gradflow.kernels import prehook
    except ImportError:
        prehook = None  # type: ignore[assignment]
    if device.startswith("cpu") and prehook is not None:
        # Built (or loaded) before any timing: a build in the background takes a core.
        built = prehook.squares_sink(wait=True) is not None
        env["grad_output_hooks"] = "c++" if built else f"python ({prehook.why_not()})"
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        env["gpu"] = props.name
        env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    return env


def print_header(title: str, env: dict[str, Any]) -> None:
    print(title)
    print(f"date    {env['date']}   host {env['host']}")
    cores = f"{env['cores']} cores ({env['usable_cores']} usable, torch threads"
    print(f"machine {env['cpu']}, {cores} {env['torch_threads']}), load {env.get('loadavg_1m')}")
    if "gpu" in env:
        print(f"gpu     {env['gpu']} ({env['gpu_memory_gb']} GB), CUDA {env['cuda']}")
    print(f"torch   {env['torch']}   python {env['python']}   git {env['git_commit']}")
    if "grad_output_hooks" in env:
        print(f"hooks   output gradients reduced by {env['grad_output_hooks']} pre-hooks")
    print()


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def script_parser(
    doc: str | None, json_help: str | None = "write all results to this JSON file"
) -> argparse.ArgumentParser:
    """The argument parser of a benchmark script.

    Args:
        doc: the script's docstring (its first line describes the script in ``--help``).
        json_help: the help of ``--json OUT``; None: no ``--json``.

    Returns:
        The parser, with ``--json`` unless ``json_help`` is None.
    """
    p = argparse.ArgumentParser(
        description=doc.splitlines()[0] if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if json_help is not None:
        p.add_argument("--json", help=json_help)
    return p


def add_trial_options(
    p: argparse.ArgumentParser, *, pairs: int, steps: int, warmup: int, fill: bool = True
) -> None:
    """``--pairs``, ``--steps-per-trial`` and ``--warmup`` of paired timing.

    Args:
        p: the parser.
        pairs: paired rounds by default.
        steps: steps per timed trial by default.
        warmup: untimed steps per variant by default.
        fill: the defaults are the options' values; False: they are None, for a script that
            fills them in from a set of defaults of its own (the help still shows these).
    """
    for flag, default, what in (
        ("--pairs", pairs, "paired rounds"),
        ("--steps-per-trial", steps, "steps per timed trial"),
        ("--warmup", warmup, "untimed steps per variant first"),
    ):
        p.add_argument(
            flag, type=int, default=default if fill else None, help=f"{what} (default {default})"
        )


def add_threads_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--threads``: :func:`torch.set_num_threads` (see :func:`set_threads`)."""
    shown = "torch's" if default is None else str(default)
    p.add_argument("--threads", type=int, default=default, help=f"torch threads (default {shown})")


def set_threads(args: argparse.Namespace) -> None:
    """Applies ``--threads`` where it was given."""
    if args.threads:
        torch.set_num_threads(args.threads)
