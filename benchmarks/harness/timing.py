"""Timing: interleaved, paired trials of training steps, and the best of interleaved repeats
of single calls."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .report import summarize
from .tools import Stepper, Tool, Unavailable, Variant
from .workloads import Trainer, Workload


@dataclass
class Rig:
    """A trainer and the tool watching it."""

    name: str
    trainer: Stepper
    tool: Tool

    def run(self, steps: int) -> None:
        clock = self.tool.clock
        if clock is not None:
            clock.resume()
        try:
            for _ in range(steps):
                self.trainer.step(self.tool)
        finally:
            if clock is not None:
                clock.pause()


Timer = Callable[[Rig, int], float]


def cpu_timer(rig: Rig, steps: int) -> float:
    """Wall seconds per step over ``steps`` steps, background work included."""
    start = time.perf_counter()
    rig.run(steps)
    rig.tool.settle()
    return (time.perf_counter() - start) / steps


class CudaTimer:
    """Seconds per step between CUDA events around the steps; ``last_wall``: the wall
    clock of the same trial, until the GPU finished and the writer took every row."""

    last_wall: float | None = None

    def __call__(self, rig: Rig, steps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        rig.run(steps)
        end.record()
        rig.tool.settle()
        end.synchronize()
        self.last_wall = (time.perf_counter() - t0) / steps
        return start.elapsed_time(end) / 1e3 / steps


@dataclass
class Pairs:
    """Per-pair seconds per step of the baseline and of one variant, measured back to back
    (``wall_*``: the wall clock of the same trials, when the timer has a ``last_wall``)."""

    baseline: list[float] = field(default_factory=list)
    variant: list[float] = field(default_factory=list)
    wall_baseline: list[float] = field(default_factory=list)
    wall_variant: list[float] = field(default_factory=list)
    cpu_baseline: list[float] = field(default_factory=list)
    cpu_variant: list[float] = field(default_factory=list)
    background_baseline: float = 0.0  # CPU s/step of the tool's own background threads
    background_variant: float = 0.0

    @property
    def ratios(self) -> list[float]:
        return [v / b for b, v in zip(self.baseline, self.variant, strict=True)]

    @property
    def cpu_ratios(self) -> list[float]:
        """Per pair, the CPU seconds a variant step cost the process over a baseline step's:
        the trials' CPU time (every thread, less the tools' background threads) plus each
        tool's background CPU time per step, averaged over all its trials."""
        return [
            (v + self.background_variant) / (b + self.background_baseline)
            for b, v in zip(self.cpu_baseline, self.cpu_variant, strict=True)
        ]

    @property
    def wall_ratios(self) -> list[float]:
        return [v / b for b, v in zip(self.wall_baseline, self.wall_variant, strict=True)]


def paired_trials(
    baseline: Rig | Mapping[str, Rig],
    variants: Sequence[Rig],
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
    Stops early (with fewer pairs) once ``deadline`` (``time.monotonic()``) has passed.

    Args:
        baseline: the rig every variant is paired with, or one per variant's name.
        variants: the rigs timed against it.
        pairs: rounds.
        steps: steps per trial.
        timer: seconds per step of a trial (with ``last_wall``: the wall clock too).
        deadline: stop adding rounds after this ``time.monotonic()``, once 2 are done.
        progress: called with a line per round.

    Returns:
        Per variant's name, its pairs of seconds per step.
    """
    baselines = baseline if isinstance(baseline, Mapping) else {s.name: baseline for s in variants}
    results = {s.name: Pairs() for s in variants}
    rigs = {id(r): r for r in [*baselines.values(), *variants]}
    background = BackgroundCpu(rigs.values())
    n = len(variants)
    for i in range(pairs):
        if deadline is not None and time.monotonic() > deadline and i >= 2:
            if progress:
                progress(f"time budget reached: stopping after {i} pairs")
            break
        order = [variants[(i + j) % n] for j in range(n)]
        for rig in order:
            pair = results[rig.name]
            for role in ("baseline", "variant") if i % 2 == 0 else ("variant", "baseline"):
                timed = baselines[rig.name] if role == "baseline" else rig
                cpu0, bg0 = time.process_time(), background.total()
                seconds = timer(timed, steps)
                cpu = time.process_time() - cpu0 - (background.total() - bg0)
                background.steps[id(timed)] += steps
                getattr(pair, role).append(seconds)
                getattr(pair, f"cpu_{role}").append(cpu / steps)
                wall = getattr(timer, "last_wall", None)
                if wall is not None:
                    getattr(pair, f"wall_{role}").append(wall)
        if progress:
            ratios = "  ".join(f"{s.name} {results[s.name].ratios[-1]:.3f}" for s in variants)
            progress(f"pair {i + 1}/{pairs}: {ratios}")
    per_step = background.per_step()
    for rig in variants:
        results[rig.name].background_baseline = per_step[id(baselines[rig.name])]
        results[rig.name].background_variant = per_step[id(rig)]
    return results


class BackgroundCpu:
    """The CPU time of the rigs' background threads (a recorder's writer), which work for
    one rig while another's trial runs: kept out of every trial's CPU time, and charged to
    its own rig per step over all its trials."""

    def __init__(self, rigs: Iterable[Rig]) -> None:
        self.rigs = list(rigs)
        self.start = {id(r): r.tool.background_cpu() for r in self.rigs}
        self.steps = dict.fromkeys(self.start, 0)

    def total(self) -> float:
        return sum(r.tool.background_cpu() for r in self.rigs)

    def per_step(self) -> dict[int, float]:
        """Per rig, background CPU seconds per timed step, once its queued work is done."""
        out = {}
        for rig in self.rigs:
            rig.tool.flush()
            used = rig.tool.background_cpu() - self.start[id(rig)]
            out[id(rig)] = used / max(self.steps[id(rig)], 1)
        return out


def pair_results(pairs: Mapping[str, Pairs]) -> dict[str, dict[str, Any]]:
    """Summaries of :func:`paired_trials`' pairs, as the scripts report them and write JSON.

    Args:
        pairs: per variant, its pairs with the (shared) baseline.

    Returns:
        ``plain``: the baseline's ``seconds_per_step`` over all pairs; per variant its
        ``seconds_per_step``, ``ratio`` (and ``wall_ratio`` where the timer had a wall
        clock) summaries and its ``pairs`` of seconds.
    """
    plain = [t for p in pairs.values() for t in p.baseline]
    out: dict[str, dict[str, Any]] = {"plain": {"seconds_per_step": summarize(plain).as_dict()}}
    for name, p in pairs.items():
        seconds: dict[str, list[float]] = {"plain": p.baseline, "variant": p.variant}
        out[name] = {
            "seconds_per_step": summarize(p.variant).as_dict(),
            "ratio": summarize(p.ratios).as_dict(),
            "pairs": seconds,
        }
        if p.cpu_ratios:
            seconds |= {"cpu_plain": p.cpu_baseline, "cpu_variant": p.cpu_variant}
            out[name]["cpu_ratio"] = summarize(p.cpu_ratios).as_dict()
            out[name]["background_cpu_per_step"] = p.background_variant
        if p.wall_ratios:
            seconds |= {"wall_plain": p.wall_baseline, "wall_variant": p.wall_variant}
            out[name]["wall_ratio"] = summarize(p.wall_ratios).as_dict()
    return out


def build_rig(
    variant: Variant, workload: Workload, folder: Path, warmup: int, kind: type[Rig] = Rig
) -> Rig:
    """A trainer of ``workload`` with the variant's tool (files in ``folder``), after
    ``warmup`` untimed steps.

    Args:
        variant: what watches training.
        workload: what is trained.
        folder: where the tool writes its files.
        warmup: steps run (and the tool's background work drained) before any timing.
        kind: the rig class (a subclass may change how steps run).

    Returns:
        The rig.

    Raises:
        Unavailable: the tool is missing, or fails on this model, with the reason.
    """
    trainer = Trainer(workload)
    try:
        tool = variant.build(trainer, folder)
    except Unavailable:
        raise
    except Exception as err:
        raise Unavailable(f"fails to attach: {type(err).__name__}: {first_line(err)}") from err
    rig = kind(variant.name, trainer, tool)
    try:
        rig.run(warmup)
        tool.settle()
    except Exception as err:
        with contextlib.suppress(Exception):
            tool.close()
        raise Unavailable(
            f"fails on {workload.model}: {type(err).__name__}: {first_line(err)}"
        ) from err
    return rig


def first_line(err: BaseException) -> str:
    """The first line of an error's message, at most 160 characters."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else "")[:160]


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
