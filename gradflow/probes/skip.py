"""The ``skip`` probe: how much of the gradient takes each skip connection of a model.

A model tells the probe where its skip connections are: every submodule with a
``skip_connections()`` method (:class:`SkipConnections`; the zoo's FCN and its blocks have
one) returns them as :class:`ShortSkipPaths` and :class:`LongSkipPaths`.

**Short skips.** A residual block sends its input ``x`` (after its max-pool, where it has
one) down two paths: the residual branch and the shortcut. The gradient reaching ``x``
through the block is the sum of the two paths' gradients, ``g = g_branch + g_shortcut``.
The probe takes ``g_branch`` at the branch's first module and ``g`` at the split point, and
``g_shortcut = g - g_branch`` (one subtraction in the gradient's dtype).

**Long skips.** An encoder stage's output ``s`` goes down to the next stage (the path
below) and across by the long skip into an up stage. The probe takes the gradient reaching
``s`` through each: that at the input of the stage below, and that at the input of the up
stage it joins (for a concatenated skip, its channels of it).

**Where in the run file.** Each skip's numbers sit in the column of the recorded layer it
names (the zoo's FCNs: a residual block's first convolution, ``down2.3.conv1``; for a long
skip, the encoder stage's last main-path convolution, ``down1.conv``, ``down2.8.conv1``);
every other layer is NaN. A skip whose layer is not recorded is not measured.

Each path is measured by an identity view inserted in front of it (a forward hook on the
module) whose gradient a tensor hook reads. The hooks act in training forwards of recorded
steps only: from the first call of a recorded layer in the step on (the recorder calls
probes on recorded steps only), which in a zoo FCN is its stem convolution, before any skip.
A model that describes no skip connection is refused when the probe attaches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradflow.errors import GradflowError
from gradflow.probes.base import Attachment, register
from gradflow.probes.calls import CallLog, CallProbe

_SHORT = ("shortcut_sq", "branch_sq", "blocks")
_LONG = ("long_sq", "below_sq", "long_skips")


@dataclass
class _Split:
    """One forward call's two paths, filled in backward: the first gradient to arrive."""

    layer_id: int
    width: int = 0  # channels of the long skip's tensor (a concat skip's share of its target)
    first: torch.Tensor | None = None


def _sq(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g, dtype=torch.float64).square()


def _tap(x: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """An identity view of ``x`` whose gradient (that of this use of ``x`` only) goes to
    ``hook``."""
    view = x.view_as(x)
    view.register_hook(torch.compiler.disable(hook))
    return view


@dataclass(frozen=True)
class ShortSkipPaths:
    """A residual block: its input splits into a branch and a shortcut, summed at its end.

    Attributes:
        split: the module at the split point: its input is the block's input, or, with
            ``split_output``, its output is (a max-pool in front of both paths).
        branch: the branch's first module; its input is the branch's copy of the split.
        column: the recorded layer whose column holds the numbers.
        split_output: see ``split``.
    """

    split: nn.Module
    branch: nn.Module
    column: nn.Module
    split_output: bool = False


@dataclass(frozen=True)
class LongSkipPaths:
    """A long skip: an encoder output taken by the module below it and, across, by the
    module whose input the skip joins.

    Attributes:
        below: the module whose input is the encoder output (the path below).
        target: the module whose input holds the skip (summed, or concatenated last).
        column: the recorded layer whose column holds the numbers.
        concat: the skip's channels are the last of ``target``'s input, not summed into it.
    """

    below: nn.Module
    target: nn.Module
    column: nn.Module
    concat: bool = False


@runtime_checkable
class SkipConnections(Protocol):
    """A module that describes its own skip connections to the skip probe."""

    def skip_connections(self) -> list[ShortSkipPaths | LongSkipPaths]:
        """This module's skip connections (not those of its submodules)."""
        ...


@register
class SkipProbe(CallProbe):
    """Sums of squares of the gradient through each skip connection and the path beside
    it, per residual block (``shortcut_sq``, ``branch_sq``, ``blocks``: calls measured)
    and per long skip (``long_sq``, ``below_sq``, ``long_skips``) that the model describes
    (:class:`SkipConnections`)."""

    name = "skip"
    columns = (*_SHORT, *_LONG)
    loss_scaled: ClassVar[Mapping[str, int]] = {
        "shortcut_sq": 2,
        "branch_sq": 2,
        "long_sq": 2,
        "below_sq": 2,
    }

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[RemovableHandle] = []
        self._log: Callable[[], CallLog] | None = None
        self._armed = False  # a recorded training forward is running (see on_output)
        self._open: dict[int, _Split] = {}  # split taken, its second path not yet reached

    def attach(self, attachment: Attachment) -> None:
        self.detach()
        model = attachment.model
        assert model is not None and attachment.current_log is not None
        self._log = attachment.current_log
        column = {id(lay.module): lay.reg_index for lay in attachment.layers}
        skips = [
            skip
            for module in model.modules()
            if isinstance(module, SkipConnections)
            for skip in module.skip_connections()
        ]
        if not skips:
            raise GradflowError(
                f"the skip probe measures skip connections, and this {type(model).__name__} "
                "has none (no residual block or long skip that a skip_connections() method "
                "describes): record it without --probes skip"
            )
        for skip in skips:
            layer_id = column.get(id(skip.column))
            if layer_id is None:
                continue
            if isinstance(skip, ShortSkipPaths):
                self._hook_short_skip(skip, layer_id)
            else:
                self._hook_long_skip(skip, layer_id)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._open, self._armed = [], {}, False

    def on_output(self, out: torch.Tensor, log: CallLog, layer_id: int, forward: bool) -> None:
        # The recorder calls this on recorded steps, in training forwards only: the first
        # recorded layer's call arms the hooks for the rest of the row.
        self._armed |= forward

    def new_row(self) -> None:
        self._armed = False
        self._open = {}

    # -- hooks ---------------------------------------------------------------------------------
    def _measuring(self, module: nn.Module, x: Any) -> bool:
        return self._armed and module.training and isinstance(x, torch.Tensor) and x.requires_grad

    def _hook_short_skip(self, skip: ShortSkipPaths, layer_id: int) -> None:
        """Tap the split point and the branch's first module's input."""
        key = id(skip)

        def split(x: torch.Tensor) -> torch.Tensor:
            pair = self._open[key] = _Split(layer_id)
            return _tap(x, lambda g: self._second(pair, g, _SHORT, subtract=True))

        def split_input(module: nn.Module, args: tuple[Any, ...]) -> Any:
            return (split(args[0]), *args[1:]) if self._measuring(module, args[0]) else None

        def split_output(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            return split(out) if self._measuring(module, out) else None

        def branch(module: nn.Module, args: tuple[Any, ...]) -> Any:
            pair = self._open.pop(key, None)
            if pair is None or not self._measuring(module, args[0]):
                return None
            return (_tap(args[0], lambda g: self._first(pair, g)), *args[1:])

        if skip.split_output:
            self._handles.append(skip.split.register_forward_hook(split_output))
        else:
            self._handles.append(skip.split.register_forward_pre_hook(split_input))
        self._handles.append(skip.branch.register_forward_pre_hook(branch))

    def _hook_long_skip(self, skip: LongSkipPaths, layer_id: int) -> None:
        """Tap the encoder output at the module below and the skip at its target."""
        key = id(skip)

        def path_below(module: nn.Module, args: tuple[Any, ...]) -> Any:
            x = args[0]
            if not self._measuring(module, x):
                return None
            pair = self._open[key] = _Split(layer_id, width=x.shape[1])
            return (_tap(x, lambda g: self._second(pair, g, _LONG)), *args[1:])

        def across(module: nn.Module, args: tuple[Any, ...]) -> Any:
            pair = self._open.pop(key, None)
            if pair is None or not self._measuring(module, args[0]):
                return None
            width = args[0].shape[1]
            channels = slice(width - pair.width, None) if skip.concat else slice(None)
            return (_tap(args[0], lambda g: self._first(pair, g[:, channels])), *args[1:])

        self._handles.append(skip.below.register_forward_pre_hook(path_below))
        self._handles.append(skip.target.register_forward_pre_hook(across))

    def _first(self, pair: _Split, g: torch.Tensor) -> None:
        """The gradient of the path backward reaches first: the residual branch's, or the
        long skip's."""
        pair.first = g

    def _second(
        self, pair: _Split, g: torch.Tensor, columns: tuple[str, ...], subtract: bool = False
    ) -> None:
        """The other gradient (``subtract``: the sum of both paths) arrives: log the row."""
        t0 = time.perf_counter()
        first = torch.zeros_like(g) if pair.first is None else pair.first
        pair.first = None
        if subtract:  # g is the split point's gradient: shortcut = total - branch
            skip_sq, other_sq = _sq(g - first), _sq(first)
        else:  # g is the path below's gradient, the first one the long skip's
            skip_sq, other_sq = _sq(first), _sq(g)
        row = torch.zeros(len(self.columns), dtype=torch.float64, device=g.device)
        start = self.columns.index(columns[0])
        row[start : start + 3] = torch.stack([skip_sq, other_sq, torch.ones_like(skip_sq)])
        assert self._log is not None
        log = self._log()
        self.append(log, pair.layer_id, g, row)
        log.hook_s += time.perf_counter() - t0
