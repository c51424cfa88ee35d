"""What a run shows: progress (a bar or plain lines) and the summary read back from its
run file at the end."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gradflow.em.checkpoint import (
    checkpoint_path,
    find_checkpoint,
)
from gradflow.em.config import TrainConfig
from gradflow.em.loop import Trainer
from gradflow.em.models import count_convs
from gradflow.runfile import Event, open_run

ProgressMode = Literal["auto", "bar", "lines", "off"]


@dataclass(frozen=True)
class Summary:
    """What a run did, read back from its run file at the end.

    ``epochs`` and ``steps`` count the whole run (a resumed one too); the timings cover
    this call only: ``seconds_per_step`` is training time (data, forward, backward, step,
    recording) per step, leaving out each epoch's first step (warm-up: allocations, cuDNN
    autotuning); ``seconds_per_validation`` is one validation pass. NaN where none was timed.
    ``overhead`` is the recorder's measured time by part (:attr:`gradflow.Run.overhead`).
    """

    path: Path
    checkpoint: Path
    file_bytes: int
    model: str
    conv_layers: int
    n_params: int
    data: str
    epochs: int
    steps: int
    best_val_loss: float
    best_epoch: int | None
    last_val_epoch: int | None
    v_rand: float
    v_info: float
    seconds_per_step: float
    seconds_per_validation: float
    overhead: dict[str, float]
    nonfinite: Event | None
    stopped_step: int | None
    interrupted: int | None = None  # the signal (SIGINT, SIGTERM) that stopped training

    @property
    def interruption(self) -> str | None:
        """``gradflow: interrupted at step S; ...`` when a signal stopped training, else None.

        S counts the steps done; a resumed run continues from the last epoch end.
        """
        if self.interrupted is None:
            return None
        how = (
            "resume with --resume"
            if self.checkpoint.is_file()
            else "no checkpoint to resume from (one is written at every epoch end)"
        )
        return f"gradflow: interrupted at step {self.steps}; {how}"

    @property
    def stop_reason(self) -> str | None:
        """One line saying why training stopped early, or None when it ran to the end."""
        if self.stopped_step is None:
            return None
        event = self.nonfinite
        if event is None or event.step > self.stopped_step:
            what = f"at step {self.stopped_step}: the loss is not finite"
        else:
            what = f"at step {event.step} (epoch {event.epoch}): {event.detail}"
        return f"training stopped {what}; {self.path} keeps every step up to there"

    def __rich__(self) -> Panel:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        grid.add_row(
            "model",
            f"{self.model}: {self.conv_layers} conv layers, {self.n_params:,} parameters",
        )
        grid.add_row("data", self.data)
        # Timings not measured (no step timed, no validation run) are left out, not NaN.
        timings = [
            f"{seconds:.{digits}f} s/{what}"
            for seconds, digits, what in (
                (self.seconds_per_step, 3, "step"),
                (self.seconds_per_validation, 2, "validation"),
            )
            if math.isfinite(seconds)
        ]
        grid.add_row(
            "training",
            f"{_count(self.epochs, 'epoch')}, {_count(self.steps, 'step')}"
            + (f"; {', '.join(timings)}" if timings else ""),
        )
        if self.best_epoch is not None:
            grid.add_row("best val_loss", f"{self.best_val_loss:.4f} at epoch {self.best_epoch}")
            grid.add_row(
                "V_rand, V_info",
                f"{self.v_rand:.4f}, {self.v_info:.4f} (epoch {self.last_val_epoch})",
            )
        else:
            grid.add_row("validation", "none")
        checkpoint = f", {self.checkpoint}" if self.checkpoint.is_file() else ""
        grid.add_row("run file", f"{self.path} ({self.file_bytes / 2**20:.1f} MB){checkpoint}")
        grid.add_row("recorder", _overhead_text(self.overhead))
        if self.nonfinite is not None:
            grid.add_row(
                "non-finite",
                f"[red]{self.nonfinite.detail} at step {self.nonfinite.step}[/red]",
            )
        return Panel(grid, title="gradflow record", expand=False)


class ProgressDisplay:
    """A rich bar on a terminal, else a flushed line every ``log_every`` steps."""

    def __init__(
        self, mode: ProgressMode, *, total: int, done: int, batch_size: int, log_every: int
    ) -> None:
        self.mode = ("bar" if sys.stdout.isatty() else "lines") if mode == "auto" else mode
        self.total, self.done = total, done
        self.batch_size, self.log_every = batch_size, log_every
        self._bar: Progress | None = None
        self._task: Any = None
        self._since = time.perf_counter()
        self._images = 0

    def __enter__(self) -> ProgressDisplay:
        if self.mode == "bar":
            self._bar = Progress(
                TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[speed]} img/s"),
                TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "steps", total=self.total, completed=self.done, epoch="-", loss="-", speed="-"
            )
        self._since = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def step(self, step: int, epoch: int, loss: torch.Tensor) -> None:
        """After optimizer step ``step`` (0-based, as in the run file)."""
        if self.mode == "off":
            return
        self._images += self.batch_size
        if self._bar is not None:
            self._bar.update(self._task, advance=1, epoch=epoch)
        if step % self.log_every:
            return
        value = loss.item()  # on CUDA the one wait for the GPU every log_every steps
        now = time.perf_counter()
        speed = self._images / max(now - self._since, 1e-9)
        self._since, self._images = now, 0
        if self._bar is not None:
            self._bar.update(self._task, loss=f"{value:.4f}", speed=f"{speed:.1f}")
        else:
            print(f"step {step} epoch {epoch} loss {value:.4f} ({speed:.1f} img/s)", flush=True)

    def note(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.mode == "lines":
            print(text, flush=True)


def console_say(text: str) -> None:
    """One line on what the run is doing before its first step."""
    print(text, flush=True)


def silent(text: str) -> None:
    """Says nothing (progress off, or a DDP rank other than 0)."""


def epoch_line(epoch: int, train_loss: float, metrics: Mapping[str, float]) -> str:
    shown = {k: v for k, v in metrics.items() if not math.isnan(v)}
    parts = [f"train_loss {train_loss:.4f}", *(f"{k} {v:.4f}" for k, v in shown.items())]
    return f"epoch {epoch} " + " ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _overhead_text(overhead: Mapping[str, float]) -> str:
    spent = sum(v for k, v in overhead.items() if k != "wall")
    wall = overhead.get("wall", 0.0)
    share = f" ({100 * spent / wall:.1f} %)" if wall else ""
    return f"{spent:.2f} s of {wall:.1f} s wall{share}"


def summarize(out: Path, config: TrainConfig, trainer: Trainer, source: str) -> Summary:
    with open_run(out) as run:
        metrics = run.metrics
        epochs = run.epochs
        val = metrics.get("val_loss", np.full(len(epochs), np.nan))
        validated = np.flatnonzero(~np.isnan(val))
        best = int(validated[np.argmin(val[validated])]) if validated.size else None
        last = int(validated[-1]) if validated.size else None
        nan = math.nan
        summary = Summary(
            path=out,
            checkpoint=find_checkpoint(out) or checkpoint_path(out),
            file_bytes=out.stat().st_size,
            model=config.model,
            conv_layers=count_convs(trainer.model)[0],
            n_params=sum(p.numel() for p in trainer.model.parameters()),
            data=f"{source}: {len(trainer.train_set)} train, {len(trainer.val_set)} validation",
            epochs=run.n_epochs,
            steps=trainer.step,
            best_val_loss=float(val[best]) if best is not None else nan,
            best_epoch=int(epochs[best]) if best is not None else None,
            last_val_epoch=int(epochs[last]) if last is not None else None,
            v_rand=float(metrics["v_rand"][last]) if last is not None else nan,
            v_info=float(metrics["v_info"][last]) if last is not None else nan,
            seconds_per_step=trainer.train_seconds / trainer.steps_timed
            if trainer.steps_timed
            else nan,
            seconds_per_validation=float(np.mean(trainer.val_seconds))
            if trainer.val_seconds
            else nan,
            overhead=run.overhead,
            nonfinite=run.first_nonfinite,
            stopped_step=trainer.stopped_step,
            interrupted=trainer.stopped_by,
        )
    return summary
