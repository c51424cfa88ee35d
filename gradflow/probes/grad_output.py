"""The ``grad_output`` probe: the gradient flowing back out of each recorded layer."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import ClassVar

import numpy as np
import torch

from gradflow.probes.base import Attachment, Check, register
from gradflow.probes.calls import CallLog, CallProbe


@register
class GradOutputProbe(CallProbe):
    """Sum of squares of dL/d(output) of each layer call, by a tensor hook on the output;
    with a GradScaler, that of the unscaled loss. Under reentrant activation checkpointing
    the output gradient flows through the call recomputed in backward: measured there."""

    name = "grad_output"
    columns = ("sum_sq",)
    loss_scaled: ClassVar[Mapping[str, int]] = {"sum_sq": 2}

    def __init__(self) -> None:
        super().__init__()
        self._hooks: dict[int, Callable[[torch.Tensor], None]] = {}
        self._no_grad_calls: dict[int, int] = {}

    def attach(self, attachment: Attachment) -> None:
        current = attachment.current_log
        assert current is not None, "the grad_output probe needs the recorder's call log"
        self._hooks = {
            lay.reg_index: grad_output_hook(self, current, lay.reg_index)
            for lay in attachment.layers
        }

    def detach(self) -> None:
        self._hooks = {}
        self._no_grad_calls = {}

    def on_output(self, out: torch.Tensor, log: CallLog, layer_id: int, forward: bool) -> None:
        if forward:
            if out.requires_grad:
                out.register_hook(self._hooks[layer_id])
            else:
                self._no_grad_calls[layer_id] = self._no_grad_calls.get(layer_id, 0) + 1
        elif out.requires_grad and self._no_grad_calls.get(layer_id):
            # Reentrant checkpointing ran this call without grad; its recomputation in
            # backward is what the output gradient flows through.
            self._no_grad_calls[layer_id] -= 1
            out.register_hook(self._hooks[layer_id])

    def new_row(self) -> None:
        self._no_grad_calls = {}

    @classmethod
    def nonfinite(cls, reductions: Mapping[str, np.ndarray]) -> list[Check]:
        bad = np.isfinite(reductions["n"][0]) & ~np.isfinite(reductions["sum_sq"][0])
        return [Check(2, "output gradient", bad, last_first=True)]


def grad_output_hook(
    probe: CallProbe, log: Callable[[], CallLog], layer_id: int
) -> Callable[[torch.Tensor], None]:
    """A tensor hook appending ``probe``'s reductions of the gradient w.r.t. a layer's
    output to the log being written when it runs."""

    def hook(grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        target = log()
        probe.reduce(grad, target, layer_id)
        target.hook_s += time.perf_counter() - t0

    # Eager even where backward is traced (compiled autograd): it reads host memory.
    disabled: Callable[[torch.Tensor], None] = torch.compiler.disable(hook)
    return disabled
