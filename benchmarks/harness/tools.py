"""What watches a training step (plain training, the gradflow recorder, other tools) and the
named variants built from them."""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds a live thread has used (0.0 for one not running)."""
    ident = thread.ident
    if ident is None or not thread.is_alive():
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(ident))
    except (AttributeError, OSError):  # no per-thread CPU clocks here
        return 0.0


class Unavailable(Exception):
    """A variant that cannot run here (tool not installed, or it fails on this model)."""


class Stepper(Protocol):
    """What a tool watches: a model, its optimizer, and one training step at a time."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_index: int

    def step(self, tool: Tool) -> torch.Tensor: ...


class OwnClock:
    """A clock that runs only while its rig trains (:meth:`resume` .. :meth:`pause`): a
    budgeted Recorder timed against it sees the wall time of its own training, not that of
    the variants interleaved with it."""

    def __init__(self) -> None:
        self._elapsed = 0.0
        self._since: float | None = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self._elapsed += time.perf_counter() - self._since
            self._since = None

    def __call__(self) -> float:
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return self._elapsed + running


class Tool:
    """Something watching a training step; the base class watches nothing (plain training).
    ``clock``: the tool's own clock, run while its rig trains (None: it needs none)."""

    clock: OwnClock | None = None

    def __init__(self, trainer: Stepper) -> None:
        self.trainer = trainer

    def backward(self, out: torch.Tensor, loss: torch.Tensor) -> None:
        loss.backward()

    def after_step(self, loss: torch.Tensor) -> None:
        """Per-step logging, after ``optimizer.step()``."""

    def settle(self) -> None:
        """Wait for work the tool queued in the background (called inside the timed trial)."""

    def flush(self) -> None:
        """Finish every piece of background work queued so far (after the timed trials)."""

    def background_cpu(self) -> float:
        """CPU seconds used so far by the tool's own background threads (0.0: none)."""
        return 0.0

    def close(self) -> None:
        """Detach from the model and release files."""


# Set by :func:`interleaved`: how many rigs' steps share the wall clock.
_SHARE = {"rigs": 1}


@contextlib.contextmanager
def interleaved(rigs: int) -> Iterator[None]:
    """Recorders made inside this block train one step in ``rigs`` of wall time (their
    trials interleaved with those of others): their writers commit after ``rigs`` times the
    Recorder's ``flush_seconds``, i.e. after as many of their own steps as when training
    alone, so that a benchmark charges commits at the rate a real run pays them."""
    before = _SHARE["rigs"]
    _SHARE["rigs"] = rigs
    try:
        yield
    finally:
        _SHARE["rigs"] = before


class GradflowTool(Tool):
    """The gradflow Recorder, used as documented: ``rec.log(loss=loss)`` after each step.
    ``native=False``: its CPU statistics by torch operations, as with ``GRADFLOW_NATIVE=0``;
    ``python_hooks``: the C kernels, but output gradients read by Python pre-hooks."""

    def __init__(
        self,
        trainer: Stepper,
        path: Path,
        *,
        every: int | None = 1,
        probes: Sequence[str] = ("param",),
        native: bool = True,
        python_hooks: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(trainer)
        from gradflow import Recorder

        self.path = path
        if "flush_seconds" not in options:
            default = inspect.signature(Recorder).parameters["flush_seconds"].default
            options["flush_seconds"] = default * _SHARE["rigs"]
        picking: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if not native:
            picking = torch_kernels()
        elif python_hooks:
            picking = without_cxx_hooks()
        with picking:
            self.recorder = Recorder(
                trainer.model,
                trainer.optimizer,
                path,
                every=every,
                probes=tuple(probes),
                overwrite=True,
                **options,
            )
            if not native or python_hooks:
                trainer.step(self)  # the statistics pick their kernels at the first step

    def after_step(self, loss: torch.Tensor) -> None:
        self.recorder.log(loss=loss)

    def settle(self) -> None:
        # No public "wait for the writer" API: wait until the writer thread has taken every
        # queued row, so its work is charged to this trial and not to the next one.
        queue = getattr(getattr(self.recorder, "_writer", None), "queue", None)
        deadline = time.monotonic() + 30.0
        while queue is not None and not queue.empty() and time.monotonic() < deadline:
            time.sleep(0.0005)

    def flush(self) -> None:
        self.recorder.flush()

    def background_cpu(self) -> float:
        writer = getattr(self.recorder, "_writer", None)
        return thread_cpu(writer) if isinstance(writer, threading.Thread) else 0.0

    def close(self) -> None:
        self.recorder.close()

    def self_reported(self) -> dict[str, float] | None:
        """The recorder's own per-recorded-step timing from the closed run file (ms)."""
        from gradflow.runfile import open_run

        try:
            with open_run(self.path) as run:
                n = max(run.n_steps, 1)
                out = {k: 1e3 * v / n for k, v in run.overhead.items() if k != "wall"}
                out["rows"] = float(run.n_steps)
                if "budget_reached" in run.attrs:
                    out["budget_reached"] = float(run.attrs["budget_reached"])
                return out
        except Exception:
            return None

    def kernel_backend(self) -> str | None:
        """The kernels the recorder used, as stored in the closed run file."""
        from gradflow.runfile import open_run

        try:
            with open_run(self.path) as run:
                backend = run.attrs.get("kernel_backend")
                return None if backend is None else str(backend)
        except Exception:
            return None


@dataclass(frozen=True)
class Variant:
    """A named way of watching training: ``build(trainer, folder)`` attaches the tool
    (writing any files into ``folder``) or raises :class:`Unavailable`."""

    name: str
    label: str
    build: Callable[[Stepper, Path], Tool]


def recorder_variant(
    name: str,
    label: str,
    every: int | None,
    probes: Sequence[str],
    native: bool = True,
    budget: float | None = None,
    python_hooks: bool = False,
) -> Variant:
    """A variant recording with gradflow into ``<folder>/<name>.h5`` (every ``every``-th
    step, or under an overhead ``budget``, timed against the rig's :class:`OwnClock`;
    ``native`` and ``python_hooks`` as for :class:`GradflowTool`)."""

    def build(trainer: Stepper, folder: Path) -> Tool:
        from gradflow.budget import BudgetSchedule

        clock = options = None
        if budget is not None:
            clock = OwnClock()
            options = {"budget": BudgetSchedule(budget, clock=clock)}
        tool = GradflowTool(
            trainer, folder / f"{name}.h5", every=every, probes=probes, native=native,
            python_hooks=python_hooks, **(options or {}),
        )  # fmt: skip
        tool.clock = clock
        return tool

    return Variant(name, label, build)


@contextlib.contextmanager
def torch_kernels() -> Iterator[None]:
    """Recorders that pick their CPU kernels inside this block use torch operations, as the
    whole process does with ``GRADFLOW_NATIVE=0``. gradflow decides that once per process:
    the decision is stood in for inside the block, and the process's own stays as it was."""
    from unittest import mock

    from gradflow.kernels import cpu as native

    with (
        mock.patch.object(native, "_library", lambda: native._Loaded(None, "torch")),
        without_cxx_hooks(),
    ):
        yield


@contextlib.contextmanager
def without_cxx_hooks() -> Iterator[None]:
    """Recorders whose output-gradient probe picks its hooks inside this block use Python
    pre-hooks (the C++ ones stand as unavailable inside it)."""
    from unittest import mock

    from gradflow.kernels import prehook

    with mock.patch.object(prehook, "squares_sink", lambda wait=False: None):
        yield
