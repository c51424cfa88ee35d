"""``GradflowCallback`` for the Hugging Face ``transformers.Trainer``::

from gradflow.integrations.transformers import GradflowCallback
trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradflowCallback("run.h5")])
"""

from __future__ import annotations

import os
from typing import Any

from gradflow.errors import GradflowError

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise GradflowError(
        "gradflow.integrations.transformers needs transformers: pip install transformers"
    ) from exc

from gradflow.integrations._common import log_last_step
from gradflow.recorder import Recorder


class GradflowCallback(TrainerCallback):
    """Record a ``transformers.Trainer`` run into a gradflow run file.

    ``GradflowCallback(path, **recorder_options)``; the options are those of
    :class:`gradflow.Recorder` (``every``, ``probes``, ``layers``, ...).

    - The Recorder attaches at ``on_train_begin`` to the Trainer's model and its own
      optimizer (accelerate's ``AcceleratedOptimizer``, unwrapped by the Recorder). Each
      optimizer step is one row: with gradient accumulation, the micro-batches of a step are
      one row, and the gradients are those the optimizer steps on, after the Trainer's
      clipping (``max_grad_norm``), which runs before ``optimizer.step()``.
    - ``loss`` and ``lr`` are the Trainer's logged ``loss`` (its mean since the previous log,
      every ``logging_steps``) and ``learning_rate``, on the row of the step they were logged
      after.
    - ``epoch_end`` when the next epoch begins or training ends (no optimizer step in
      between), so that the evaluation run at the epoch's end is there: its ``eval_*``
      metrics are the epoch's metrics.
    - The file is closed at ``on_train_end``. The Trainer has no exception hook: where
      ``train()`` raises, call :meth:`close` (a later ``train()`` also closes it first).
    """

    def __init__(self, path: str | os.PathLike[str], **recorder_options: Any) -> None:
        self.path = path
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._epoch_metrics: dict[str, float] | None = None

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.close()
        if model is None or optimizer is None:
            raise GradflowError("GradflowCallback: the Trainer passed no model or optimizer")
        options = dict(self.recorder_options)
        options.setdefault(
            "config",
            {
                "integration": "transformers",
                "model": type(model).__name__,
                "optimizer": type(getattr(optimizer, "optimizer", optimizer)).__name__,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "max_grad_norm": args.max_grad_norm,
                "learning_rate": args.learning_rate,
                "seed": args.seed,
            },
        )
        self.recorder = Recorder(model, optimizer, self.path, **options)
        self._epoch_metrics = None

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.recorder is None or not logs:
            return
        if self._epoch_metrics is not None:
            self._epoch_metrics.update(
                (k, float(v))
                for k, v in logs.items()
                if k.startswith("eval_") and isinstance(v, (int, float))
            )
        scalars = {
            name: float(logs[key])
            for key, name in (("loss", "loss"), ("learning_rate", "lr"))
            if isinstance(logs.get(key), (int, float))
        }
        if "loss" in scalars:
            log_last_step(self.recorder, **scalars)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.recorder is not None:
            self._epoch_metrics = {}

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def _close_epoch(self) -> None:
        metrics, self._epoch_metrics = self._epoch_metrics, None
        if self.recorder is not None and metrics is not None:
            self.recorder.epoch_end(**metrics)

    def close(self) -> None:
        """Close the run file (the callback does it at ``on_train_end``)."""
        self._close_epoch()
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            recorder.close()


__all__ = ["GradflowCallback"]
