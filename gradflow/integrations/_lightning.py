"""The Lightning callback's behaviour, shared by the ``lightning.pytorch`` and
``pytorch_lightning`` flavours (this module imports neither)."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from gradflow.errors import GradflowError
from gradflow.integrations._common import log_last_step
from gradflow.recorder import Recorder

# Logged names tried, in order, when training_step returns no loss.
_LOSS_NAMES = ("loss", "train_loss", "train_loss_step")


class LightningRecording:
    """Record a Lightning ``Trainer.fit`` into a gradflow run file.

    ``GradflowCallback(path, **recorder_options)``; the options are those of
    :class:`gradflow.Recorder` (``every``, ``probes``, ``layers``, ...).

    - The Recorder attaches at ``on_train_start`` to the LightningModule and the Trainer's
      optimizers (a list where there are several), so each optimizer step is one row, in
      automatic optimization (a closure step) and in manual optimization alike.
    - ``loss``: the training_step loss of the micro-batches of each optimizer step (their
      mean, also for an epoch's last, shorter accumulation), kept on the device; where
      training_step returns no loss, the logged ``loss`` / ``train_loss`` /
      ``train_loss_step`` of ``trainer.callback_metrics``.
    - ``epoch_end`` at each training epoch end, with the epoch's logged metrics
      (``trainer.callback_metrics`` less the per-step ``*_step`` values).
    - Under DDP only the Recorder's ``write_rank`` (rank 0 by default) writes.
    - The file is closed at the end of ``fit`` and when training raises.
    """

    def __init__(self, path: str | os.PathLike[str], **recorder_options: Any) -> None:
        self.path = path
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._steps_before_batch = 0
        self._losses: list[torch.Tensor] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.close()
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise GradflowError("GradflowCallback: the LightningModule configured no optimizer")
        options = dict(self.recorder_options)
        options.setdefault(
            "config",
            {
                "integration": "lightning",
                "model": type(pl_module).__name__,
                "optimizer": [type(o).__name__ for o in optimizers],
                "max_epochs": trainer.max_epochs,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "gradient_clip_val": trainer.gradient_clip_val,
            },
        )
        optimizer = optimizers[0] if len(optimizers) == 1 else optimizers
        self.recorder = Recorder(pl_module, optimizer, self.path, **options)
        self._losses = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._steps_before_batch = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.recorder is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
        if trainer.global_step == self._steps_before_batch:
            return  # accumulating: no optimizer step in this batch
        losses, self._losses = self._losses, []
        if losses:
            # Automatic optimization returns every loss divided by the accumulation count,
            # also in a last, shorter accumulation of the epoch.
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            log_last_step(self.recorder, loss=torch.stack(losses).sum() * scale / len(losses))
            return
        logged = trainer.callback_metrics
        name = next((n for n in _LOSS_NAMES if n in logged), None)
        if name is not None:
            log_last_step(self.recorder, loss=logged[name])

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.recorder is None:
            return
        metrics = {
            name: value
            for name, value in trainer.callback_metrics.items()
            if not name.endswith("_step")
            and (not isinstance(value, torch.Tensor) or value.numel() == 1)
        }
        self.recorder.epoch_end(**metrics)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        with contextlib.suppress(GradflowError):  # keep the training's own exception
            self.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.close()

    def close(self) -> None:
        """Close the run file (done by the callback at fit end and on exceptions)."""
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            recorder.close()
