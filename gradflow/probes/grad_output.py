"""The ``grad_output`` probe: the gradient flowing back out of each recorded layer."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from gradflow.eager import eager
from gradflow.kernels import prehook
from gradflow.kernels.prehook import SquaresSink
from gradflow.probes.base import Attachment, Check, register
from gradflow.probes.calls import CallLog, CallProbe


@register
class GradOutputProbe(CallProbe):
    """Sum of squares of dL/d(output) of each layer call, by a pre-hook on the node that
    made the output (in C++ on the CPU where :mod:`gradflow.kernels.prehook` is built, else
    in Python), a tensor hook on a leaf; with a GradScaler, that of the unscaled loss.
    Under reentrant activation checkpointing the output gradient flows through the call
    recomputed in backward: measured there."""

    name = "grad_output"
    columns = ("sum_sq",)
    loss_scaled: ClassVar[Mapping[str, int]] = {"sum_sq": 2}

    def __init__(self) -> None:
        super().__init__()
        self._current: Callable[[], CallLog] | None = None
        self._hooks: dict[tuple[int, int], Callable[..., None]] = {}
        self._no_grad_calls: dict[int, int] = {}
        self._sink: SquaresSink | None = None  # the C++ hooks' rows, once built
        self._native = True  # C++ hooks built, being built, or not asked for yet

    def attach(self, attachment: Attachment) -> None:
        assert attachment.current_log is not None, "the grad_output probe needs the call log"
        self._current = attachment.current_log
        self._hooks = {}

    def detach(self) -> None:
        self._current = None
        self._hooks = {}
        self._no_grad_calls = {}
        if self._sink is not None:
            self._sink.close()
        self._sink, self._native = None, True

    def on_output(self, out: torch.Tensor, log: CallLog, layer_id: int, forward: bool) -> None:
        if forward:
            if out.requires_grad:
                self._watch(out, layer_id)
            else:
                self._no_grad_calls[layer_id] = self._no_grad_calls.get(layer_id, 0) + 1
        elif out.requires_grad and self._no_grad_calls.get(layer_id):
            # Reentrant checkpointing ran this call without grad; its recomputation in
            # backward is what the output gradient flows through.
            self._no_grad_calls[layer_id] -= 1
            self._watch(out, layer_id)

    def _watch(self, out: torch.Tensor, layer_id: int) -> None:
        """Reduce the gradient w.r.t. ``out`` when backward reaches it: by a pre-hook on the
        node that made ``out`` (half the cost of a tensor hook, the same gradient: the node's
        gradient for that output, accumulated over every use of it), a tensor hook on a leaf.
        On the CPU the pre-hook is the C++ one where it is built (not under compiled
        autograd, which takes only Python hooks)."""
        if self._native and out.is_cpu and not prehook.compiled_autograd():
            sink = self._sink
            if sink is None:
                sink = self._sink = prehook.squares_sink()
                self._native = sink is not None or prehook.building()
            if sink is not None and sink.watch(out, layer_id) == 1:
                return
        node = out.grad_fn
        key = (layer_id, -1 if node is None else out.output_nr)
        hook = self._hooks.get(key)
        if hook is None:
            assert self._current is not None, "the grad_output probe is not attached"
            hook = self._hooks[key] = grad_output_hook(self, self._current, *key)
        if node is None:
            out.register_hook(hook)
        else:
            node.register_prehook(hook)

    def new_row(self) -> None:
        self._no_grad_calls = {}

    def collect(self, log: CallLog) -> None:
        if self._sink is not None:
            sums, layers, sizes, seconds = self._sink.take()
            log.extend(self, sums[:, None], layers.tolist(), sizes.tolist())
            log.hook_s += seconds

    @classmethod
    def nonfinite(cls, reductions: Mapping[str, np.ndarray]) -> list[Check]:
        bad = np.isfinite(reductions["n"][0]) & ~np.isfinite(reductions["sum_sq"][0])
        return [Check(2, "output gradient", bad, last_first=True)]


def grad_output_hook(
    probe: CallProbe, log: Callable[[], CallLog], layer_id: int, output_nr: int = -1
) -> Callable[..., None]:
    """A hook appending ``probe``'s reductions of the gradient w.r.t. a layer's output to
    the log being written when it runs: a tensor hook (``output_nr`` -1), else a pre-hook
    of the node that made the output, which reads the gradient of output ``output_nr``."""

    def hook(grad: Any) -> None:
        if output_nr >= 0:
            grad = grad[output_nr]
            if grad is None:  # no gradient flowed into this output of the node
                return
        t0 = time.perf_counter()
        target = log()
        probe.reduce(grad, target, layer_id)
        target.hook_s += time.perf_counter() - t0

    # Eager even where backward is traced (compiled autograd): it reads host memory.
    return eager(hook)
