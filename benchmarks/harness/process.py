"""Measurements of this process: resident memory, hooks, the bytes of a run file."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .timing import Rig


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far.

    Reads VmHWM from /proc: ``getrusage``'s ru_maxrss survives ``exec``, so in a fresh
    subprocess it would still report the parent's size at ``fork`` time.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def current_rss_mb() -> float:
    """Resident memory now (reads /proc; falls back to psutil, then to the peak)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return peak_rss_mb()


def dataset_bytes(path: Path) -> dict[str, int]:
    """Bytes each dataset of an HDF5 file occupies (its stored, compressed chunks)."""
    import h5py

    sizes: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            sizes[name] = obj.id.get_storage_size()

    with h5py.File(path, "r", swmr=True) as f:
        f.visititems(visit)
    return sizes


def children_rss_mb() -> float | None:
    """Resident memory of this process's child processes (e.g. wandb's service), or None."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OPTIMIZER_HOOK_DICTS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def count_hooks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Hooks on every module, parameter and the optimizer, plus torch's global module hooks."""
    n = 0
    for module in model.modules():
        n += sum(len(getattr(module, name, None) or {}) for name in _MODULE_HOOK_DICTS)
    for p in model.parameters():
        n += len(getattr(p, "_backward_hooks", None) or {})
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    if optimizer is not None:
        n += sum(len(getattr(optimizer, name, None) or {}) for name in _OPTIMIZER_HOOK_DICTS)
    glob = torch.nn.modules.module
    for name in dir(glob):
        if name.startswith("_global_") and name.endswith("hooks"):
            n += len(getattr(glob, name))
    return n


# -- measurements in a fresh process ------------------------------------------------------------
CHILD_TAG = "@@result "


def peak_of(rig: Rig, steps: int) -> dict[str, float | None]:
    """Run ``steps`` more steps of ``rig`` (its background work drained), then close its
    tool.

    Args:
        rig: a rig built and warmed up in this (fresh) process.
        steps: steps to run.

    Returns:
        ``peak_rss_mb`` of this process and ``children_rss_mb`` of its child processes.
    """
    rig.run(steps)
    rig.tool.settle()
    out = {"peak_rss_mb": peak_rss_mb(), "children_rss_mb": children_rss_mb()}
    rig.tool.close()
    return out


def report_to_parent(result: dict[str, Any]) -> None:
    """Print ``result`` as the tagged JSON line that :func:`run_child` reads."""
    print(CHILD_TAG + json.dumps(result), flush=True)


def run_child(cmd: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd`` (a script that ends with :func:`report_to_parent`) in a fresh process.

    Args:
        cmd: the command line.
        timeout: seconds before it is stopped.

    Returns:
        The child's result, or ``{"error": why}``.
    """
    # Not the parent's WANDB_* (its WANDB_SERVICE would make the child reuse the parent's
    # wandb service process instead of starting, and counting, its own).
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_TAG):
            return dict(json.loads(line[len(CHILD_TAG) :]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"subprocess exited {proc.returncode}: {tail[:160]}"}
