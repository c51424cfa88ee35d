"""Timing: interleaved, paired trials of training steps, and the best of interleaved repeats
of single calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .tools import Stepper, Tool


@dataclass
class Session:
    """A trainer and the tool watching it."""

    name: str
    trainer: Stepper
    tool: Tool

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.trainer.step(self.tool)


Timer = Callable[[Session, int], float]


def cpu_timer(session: Session, steps: int) -> float:
    """Wall seconds per step over ``steps`` steps, background work included."""
    start = time.perf_counter()
    session.run(steps)
    session.tool.settle()
    return (time.perf_counter() - start) / steps


@dataclass
class Pairs:
    """Per-pair seconds per step of the baseline and of one variant, measured back to back
    (``wall_*``: the wall clock of the same trials, when the timer has a ``last_wall``)."""

    baseline: list[float] = field(default_factory=list)
    variant: list[float] = field(default_factory=list)
    wall_baseline: list[float] = field(default_factory=list)
    wall_variant: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [v / b for b, v in zip(self.baseline, self.variant, strict=True)]

    @property
    def wall_ratios(self) -> list[float]:
        return [v / b for b, v in zip(self.wall_baseline, self.wall_variant, strict=True)]


def paired_trials(
    baseline: Session,
    variants: Sequence[Session],
    *,
    pairs: int,
    steps: int,
    timer: Timer = cpu_timer,
    deadline: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Pairs]:
    """Round ``i`` times, for every variant, ``steps`` baseline steps and ``steps`` variant
    steps back to back: baseline first in even rounds, variant first in odd ones. The
    variants' order rotates from round to round, so no variant always follows the same one.
    Stops early (with fewer pairs) once ``deadline`` (``time.monotonic()``) has passed."""
    results = {s.name: Pairs() for s in variants}
    n = len(variants)
    for i in range(pairs):
        if deadline is not None and time.monotonic() > deadline and i >= 2:
            if progress:
                progress(f"time budget reached: stopping after {i} pairs")
            break
        order = [variants[(i + j) % n] for j in range(n)]
        for session in order:
            pair = results[session.name]
            for role in ("baseline", "variant") if i % 2 == 0 else ("variant", "baseline"):
                seconds = timer(baseline if role == "baseline" else session, steps)
                getattr(pair, role).append(seconds)
                wall = getattr(timer, "last_wall", None)
                if wall is not None:
                    getattr(pair, f"wall_{role}").append(wall)
        if progress:
            ratios = "  ".join(f"{s.name} {results[s.name].ratios[-1]:.3f}" for s in variants)
            progress(f"pair {i + 1}/{pairs}: {ratios}")
    return results


def interleaved_best(
    fns: Mapping[str, Callable[[], Any]], repeats: int, *, evict_mb: int = 0
) -> dict[str, float]:
    """Best seconds of each function over ``repeats``, the functions called in turn in every
    repeat after one untimed round. The best, not the median: what the machine can do, in
    the repeat least disturbed by other processes. ``evict_mb``: each call comes after
    writing a buffer that large (untimed), so data comes from memory, as it does after an
    optimizer step and a forward and backward pass, not from a cache warm from the previous
    call.

    Args:
        fns: the calls to time, by name.
        repeats: timed rounds.
        evict_mb: MB written before each call (0: none).

    Returns:
        The best seconds per call, by name.
    """
    scratch = torch.empty(evict_mb * 2**20 // 4) if evict_mb else None
    best = dict.fromkeys(fns, float("inf"))
    for i in range(repeats + 1):
        for name, fn in fns.items():
            if scratch is not None:
                scratch.fill_(float(i))
            start = time.perf_counter()
            fn()
            if i:
                best[name] = min(best[name], time.perf_counter() - start)
    return best
