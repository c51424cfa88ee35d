"""``GradflowHandler`` for PyTorch Ignite engines (also MONAI's, which are Ignite engines)::

from gradflow.integrations.ignite import GradflowHandler
trainer = create_supervised_trainer(model, optimizer, loss_fn)
GradflowHandler("run.h5").attach(trainer, model, optimizer)
trainer.run(loader, max_epochs=5)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from gradflow.errors import GradflowError

try:
    from ignite.engine import Engine, Events
except ImportError as exc:
    raise GradflowError(
        "gradflow.integrations.ignite needs PyTorch Ignite: pip install pytorch-ignite"
    ) from exc

from gradflow.integrations._common import log_last_step
from gradflow.recorder import Recorder


def loss_of(output: Any) -> Any:
    """The default ``output_transform``: the engine's output itself where it is a number or
    a one-element tensor (``create_supervised_trainer``'s ``loss.item()``), its ``"loss"``
    where it is a dict, the first item's ``"loss"`` where it is a list of dicts (MONAI's
    ``SupervisedTrainer`` decollates its output into one dict per sample, each holding the
    batch's loss).

    Args:
        output: ``engine.state.output``.

    Returns:
        the loss.

    Raises:
        GradflowError: for any other output.
    """
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    if isinstance(output, Real) or (isinstance(output, torch.Tensor) and output.numel() == 1):
        return output
    raise GradflowError(
        f"GradflowHandler: no loss in the engine's output ({type(output).__name__}); "
        "pass output_transform=lambda output: <the loss> (or lambda output: None)"
    )


class GradflowHandler:
    """Record an Ignite engine's training into a gradflow run file.

    ``GradflowHandler(path, output_transform=..., **recorder_options).attach(trainer, model,
    optimizer)``; the options are those of :class:`gradflow.Recorder` (``every``,
    ``probes``, ``layers``, ...).

    - The Recorder attaches at ``Events.STARTED`` (each run of the engine writes a new
      file); each optimizer step is one row, also with gradient accumulation
      (``create_supervised_trainer(..., gradient_accumulation_steps=k)``, MONAI's
      ``accumulation_steps``): an iteration whose process function stepped the optimizer
      closes the row.
    - ``loss``: the mean of ``output_transform(engine.state.output)`` over the iterations
      (micro-batches) of each optimizer step, tensors kept on the device. Under
      accumulation both Ignite and MONAI output each micro-batch's own loss (the
      backward pass divides it by ``k``, the output does not).
    - ``epoch_end`` for each epoch, with the numbers on ``engine.state.metrics`` and on the
      ``metrics_from`` engines' (a validation evaluator's). It is written when the next epoch
      starts or the run completes, so that evaluations run by other
      ``Events.EPOCH_COMPLETED`` handlers, attached before or after this one, are in it
      (where one of those raises, the epoch is written without metrics).
    - The file is closed on ``Events.COMPLETED`` and on ``Events.EXCEPTION_RAISED``; the
      exception is raised again (Ignite swallows it where a handler of that event returns;
      it calls them in order and stops at the first that raises, as MONAI's do).

    Args:
        path: the run file to write.
        output_transform: ``engine.state.output -> loss`` (a number, a one-element tensor,
            or None for no loss); default :func:`loss_of`.
        **recorder_options: keyword arguments of :class:`gradflow.Recorder`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        output_transform: Callable[[Any], Any] = loss_of,
        **recorder_options: Any,
    ) -> None:
        self.path = path
        self.output_transform = output_transform
        self.recorder_options = recorder_options
        self.recorder: Recorder | None = None
        self._metrics_from: list[Engine] = []
        self._steps_before = 0
        self._loss_sum: Any = None
        self._loss_count = 0
        self._epoch_open = False

    def attach(
        self,
        engine: Engine,
        model: torch.nn.Module,
        optimizer: Any,
        metrics_from: Engine | Sequence[Engine] = (),
    ) -> GradflowHandler:
        """Record ``engine``'s training of ``model`` by ``optimizer``.

        Args:
            engine: the trainer (an ``ignite.engine.Engine``, e.g. MONAI's
                ``SupervisedTrainer``).
            model: the module it trains.
            optimizer: its optimizer, or a list of optimizers (as for the Recorder).
            metrics_from: engines (e.g. the validation evaluator) whose
                ``state.metrics`` are recorded at each epoch end too.

        Returns:
            this handler.
        """
        if not isinstance(engine, Engine):
            raise GradflowError(
                f"GradflowHandler.attach needs an ignite Engine, got {type(engine).__name__}"
            )
        self._metrics_from = _as_list(metrics_from)
        engine.add_event_handler(Events.STARTED, self._started, model, optimizer)
        engine.add_event_handler(Events.EPOCH_STARTED, self._close_epoch)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)
        return self

    def _started(self, engine: Engine, model: torch.nn.Module, optimizer: Any) -> None:
        self.close()
        options = dict(self.recorder_options)
        options.setdefault(
            "config",
            {
                "integration": "ignite",
                "engine": type(engine).__name__,
                "model": type(model).__name__,
                "optimizer": [type(o).__name__ for o in _as_list(optimizer)],
                "max_epochs": engine.state.max_epochs,
                "epoch_length": engine.state.epoch_length,
                "accumulation_steps": getattr(engine, "accumulation_steps", None),
            },
        )
        self.recorder = Recorder(model, optimizer, self.path, **options)
        self._loss_sum, self._loss_count = None, 0
        self._epoch_open = False

    def _iteration_started(self, engine: Engine) -> None:
        if self.recorder is not None:
            self._steps_before = self.recorder.step

    def _iteration_completed(self, engine: Engine) -> None:
        if self.recorder is None:
            return
        loss = self.output_transform(engine.state.output)
        if loss is not None:
            self._add_loss(loss)
        if self.recorder.step == self._steps_before:
            return  # accumulating: the optimizer did not step in this iteration
        total, count = self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        if count:
            log_last_step(self.recorder, loss=total / count)

    def _add_loss(self, loss: Any) -> None:
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise GradflowError(
                    f"GradflowHandler: the loss must be a scalar, got shape {tuple(loss.shape)}"
                )
            # Summed in at least float32: half-precision sums of many losses round off.
            loss = loss.detach().reshape(()).to(torch.promote_types(loss.dtype, torch.float32))
        else:
            loss = float(loss)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def _epoch_completed(self, engine: Engine) -> None:
        self._epoch_open = self.recorder is not None

    def _close_epoch(self, engine: Engine) -> None:
        if not self._epoch_open or self.recorder is None:
            return
        self._epoch_open = False
        metrics: dict[str, Any] = {}
        for source in [engine, *self._metrics_from]:
            metrics.update(_numbers(source.state.metrics))
        self.recorder.epoch_end(**metrics)

    def _completed(self, engine: Engine) -> None:
        self._close_epoch(engine)
        self.close()

    def _exception_raised(self, engine: Engine, exception: BaseException) -> None:
        with contextlib.suppress(GradflowError):  # keep the training's own exception
            if self._epoch_open and self.recorder is not None:
                # An epoch-end handler raised: the epoch's metrics may be missing or stale.
                self._epoch_open = False
                self.recorder.epoch_end()
            self.close()
        raise exception

    def close(self) -> None:
        """Close the run file (the handler does it on ``COMPLETED`` and on exceptions)."""
        recorder, self.recorder = self.recorder, None
        self._epoch_open = False
        if recorder is not None:
            recorder.close()


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _numbers(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics that are numbers or one-element tensors (not bools, lists, matrices)."""
    return {
        name: value
        for name, value in metrics.items()
        if (isinstance(value, Real) and not isinstance(value, bool))
        or (isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool)
    }


__all__ = ["GradflowHandler", "loss_of"]
