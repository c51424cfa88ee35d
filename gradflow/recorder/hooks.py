"""The Recorder's hooks on the model, its layers, its optimizers and a grad scaler: where
they attach, and what each does when it runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from gradflow.eager import eager
from gradflow.layers import eager_name, first_tensor, floating_tensors
from gradflow.recorder.base import RecorderBase
from gradflow.recorder.options import hooked, unwrap_optimizer
from gradflow.recorder.rows import RowPhase

STEPPING = RowPhase.STEPPING


def _inert(*args: Any, **kwargs: Any) -> None:
    """What a copied hook becomes: it does nothing."""


def _inert_hook() -> Callable[..., None]:
    return _inert


class Hook:
    """A Recorder's hook on a module or an optimizer: calls ``method(*bound, *args)``.

    Copies of the module (``copy.deepcopy``, ``AveragedModel``, pickling, ``torch.save`` of
    the whole model) copy its hook dictionaries; a copy of this hook is :func:`_inert`, so
    a copied model neither drags the Recorder along nor records into it.
    """

    __slots__ = ("_call",)

    def __init__(self, method: Callable[..., Any], *bound: Any) -> None:
        self._call = partial(method, *bound) if bound else method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _inert

    def __copy__(self) -> Callable[..., None]:
        return _inert

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return (_inert_hook, ())


class HooksMixin(RecorderBase):
    """Attaching and detaching the hooks, and the hooks themselves.

    Hooks that Dynamo may trace (torch.compile) do only attribute checks and dict updates;
    their work runs in torch.compiler.disable'd methods, eagerly, on real tensors (a graph
    break on recorded steps, none on unrecorded ones: Dynamo guards on the checks).
    """

    def _init_hooks(self, scaler: Any) -> None:
        self._handles: list[Any] = []
        self._layer_handles = []
        self._order_handles = []
        self._module_ids = set()
        self._scaler = scaler
        self._scaler_step: Any = None
        self._backward_task = -1  # the backward pass whose end makes a row (no optimizer)
        self._forward_seen = False
        self._stepped = False  # optimizer.step() ran inside the grad scaler's step
        self._wrapped_steps: list[Any] = []  # optimizer-like objects whose step() is wrapped

    # Hooks that Dynamo may trace (torch.compile) do only attribute checks and dict updates;
    # their work runs in torch.compiler.disable'd methods, eagerly, on real tensors (a graph
    # break on recorded steps, none on unrecorded ones: Dynamo guards on the checks).
    def _attach(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(Hook(self._on_root_pre)))
        self._handles.append(model.register_forward_hook(Hook(self._on_root_post)))
        self._hook_layers()
        for name, module in model.named_modules():
            self._order_handles.append(
                module.register_forward_pre_hook(Hook(self._note_call, eager_name(name)))
            )
        for index, opt in enumerate(self._optimizers):
            if hooked(opt):
                self._handles.append(opt.register_step_pre_hook(Hook(self._on_step_pre, index)))
                self._handles.append(opt.register_step_post_hook(Hook(self._on_step_post, index)))
            else:
                self._wrap_step(index, opt)
        self._module_ids = {id(m) for m in model.modules()}
        registration = torch.nn.modules.module
        self._handles.append(
            registration.register_module_module_registration_hook(self._on_registration)
        )
        self._handles.append(
            registration.register_module_parameter_registration_hook(self._on_registration)
        )
        if self._scaler is not None:
            self._wrap_scaler()

    def _hook_layers(self) -> None:
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles = []
        if self._call_probes:
            attachment = self._attachment()
            for probe in self._call_probes:
                probe.attach(attachment)
            # A frozen layer is not measured: no hook, no cost per step.
            for lay in (lay for lay in self._layers if lay.params):
                self._layer_handles.append(
                    lay.module.register_forward_hook(Hook(self._on_layer_output, lay.reg_index))
                )

    def _detach(self) -> None:
        for probe in self._probes:
            probe.detach()
        for handle in self._handles + self._layer_handles + self._order_handles:
            handle.remove()
        self._handles, self._layer_handles, self._order_handles = [], [], []
        if self._scaler_step is not None:
            del self._scaler.step
            self._scaler_step = None
        for opt in self._wrapped_steps:
            del opt.step
        self._wrapped_steps = []

    def _on_registration(self, module: nn.Module, name: str, value: Any) -> None:
        if id(module) in self._module_ids:
            self._rows.dirty = True

    def _note_call(self, name: str, module: nn.Module, args: Any) -> None:
        if module.training and not self._layout_sent:
            self._call_order.setdefault(name, len(self._call_order))

    @torch.compiler.disable
    def _on_root_pre(self, module: nn.Module, args: Any) -> None:
        self._forward_seen = True
        rows = self._rows
        rows.root_trained |= module.training and self._active
        # Re-derived before the forward: a layer frozen or unfrozen since the last step is
        # measured (its output too) from this step on, or not.
        if (
            self._active
            and self._layout_sent
            and rows.phase is not STEPPING
            and self._layout_changed()
        ):
            self._rederive()
        if rows.phase is RowPhase.CLOSED:
            self._finalize_row()

    @torch.compiler.disable
    def _on_root_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:
            return
        if not self._layout_sent:
            self._ensure_layout()
        if not self._optimizers and self._active:
            # Every output: a loss may use any of them (one row per backward, see below).
            for out in floating_tensors(output):
                if out.requires_grad:
                    out.register_hook(self._queue_backward_end)

    def _on_layer_output(self, layer_id: int, module: nn.Module, args: Any, output: Any) -> None:
        if self._active and module.training:
            self._layer_output(layer_id, output)

    @eager
    def _layer_output(self, layer_id: int, output: Any) -> None:
        self._rows.layer_called = True
        out = first_tensor(output)
        if out is None or self._rows.replaying:
            return
        t0 = time.perf_counter()
        # A forward, not a recomputation in backward (activation checkpointing)
        forward = torch._C._current_graph_task_id() == -1
        for probe in self._call_probes:
            probe.on_output(out, self._log, layer_id, forward)
        self._hook_s += time.perf_counter() - t0

    def _queue_backward_end(self, grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._backward_task:  # once per backward, however many outputs it reaches
            self._backward_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._ensure_layout()
        self._check_layout()
        self._begin(0, measure=True)
        self._end(0, stepped=False, has_update=False)

    @torch.compiler.disable
    def _on_step_pre(self, index: int, optimizer: Any, args: Any, kwargs: Any) -> Any:
        # args[0] is the optimizer itself (step hooks see the bound call's arguments).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:  # else the layout waits for the closure's forward (its order)
            self._ensure_layout()
        if self._rows.has_stepped(index):  # stepped again before every optimizer stepped once
            # Layer calls since this optimizer's last step belong to the row it opens now.
            self._close_step(carry=True)
        elif self._rows.phase is STEPPING and self._active and self._layout_changed():
            # Parameters changed between two optimizers' steps: the row measured so far
            # closes with the old layout, this step opens one with the new, which closes
            # once the optimizers that had not stepped have.
            self._close_step(carry=True, split=len(self._rows.stepped))
        if self._rows.phase is not STEPPING:
            self._check_layout()
        self._stepped = True
        self._begin(index, measure=closure is None)
        if closure is None or not self._active:
            return None
        wrapped = self._wrap_closure(closure, index)
        if "closure" in kwargs:
            return args, {**kwargs, "closure": wrapped}
        return (args[0], wrapped, *args[2:]), kwargs

    @torch.compiler.disable
    def _on_step_post(self, index: int, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._end(index, stepped=True, has_update=True)

    def _wrap_closure(self, closure: Callable[..., Any], index: int) -> Callable[..., Any]:
        calls = 0

        def first_call_measured(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                with self._rows.replay():
                    return closure(*args, **kwargs)
            result = closure(*args, **kwargs)
            # Optimizers call the closure before they change the weights: these are the
            # weights and gradients of the step.
            self._measure_before(index)
            return result

        return first_call_measured

    def _wrap_step(self, index: int, optimizer: Any) -> None:
        """Measure around the ``step()`` of an optimizer-like object without step hooks
        (as the step hooks of a torch optimizer would)."""
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            changed = self._on_step_pre(index, optimizer, (optimizer, *args), kwargs)
            if changed is not None:
                (_, *args), kwargs = changed
            out = original(*args, **kwargs)
            self._on_step_post(index, optimizer, (), {})
            return out

        optimizer.step = step
        self._wrapped_steps.append(optimizer)

    def _wrap_scaler(self) -> None:
        scaler = self._scaler
        original = scaler.step
        index_of = {id(opt): i for i, opt in enumerate(self._optimizers)}

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            self._stepped = False
            scale = getattr(scaler, "_scale", None)
            scale = scale.detach().clone().reshape(()) if isinstance(scale, torch.Tensor) else None
            out = original(optimizer, *args, **kwargs)
            index = index_of.get(id(unwrap_optimizer(optimizer)))
            if not self._stepped and index is not None:
                # The scaler found inf/NaN and skipped optimizer.step().
                self._ensure_layout()
                if self._rows.has_stepped(index):
                    self._close_step(carry=True)
                self._begin(index, measure=True)
                self._end(index, stepped=False, has_update=True, skipped=True)
            if scale is not None:
                self._rows.log({"scale": scale}, recorded=self._active)
            return out

        scaler.step = step
        self._scaler_step = step
