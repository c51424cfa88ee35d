"""Which modules are layers, in which order, and what they output.

A layer is a module that directly owns parameters, trainable or not; the recorder measures
the parameters of each one that require gradients (none while it is frozen: its statistics
are NaN then) and, through its forward hook, its output.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from gradflow.runfile import Layer

_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.conv._ConvNd, "conv"),
    (nn.Linear, "linear"),
    (nn.modules.batchnorm._BatchNorm, "bn"),
    (nn.GroupNorm, "gn"),
    (nn.LayerNorm, "ln"),
    (nn.modules.instancenorm._InstanceNorm, "in"),
    (nn.Embedding, "embedding"),
    (nn.MultiheadAttention, "attention"),
)


def layer_kind(module: nn.Module) -> str:
    """A short kind for a module: conv, linear, bn, gn, ln, in, embedding, attention, other."""
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return "other"


@dataclass
class LayerSpec:
    """A module that directly owns parameters: all of them (``owned``) and those that
    require gradients (``params``: measured; none while the layer is frozen)."""

    name: str
    module: nn.Module
    params: list[nn.Parameter]
    reg_index: int
    depth: int = -1
    aliases: list[str] = field(default_factory=list)  # other modules owning its parameters
    owned: list[nn.Parameter] = field(default_factory=list)  # every parameter it owns

    @property
    def n_params(self) -> int:
        """Elements of the measured (trainable) parameters."""
        return sum(p.numel() for p in self.params)

    def info(self, index: int) -> Layer:
        owned = self.owned or self.params
        shape = "+".join("x".join(str(s) for s in p.shape) or "1" for p in owned)
        return Layer(
            index=index,
            name=self.name or "(root)",
            kind=layer_kind(self.module),
            type=type(self.module).__name__,
            depth=self.depth,
            n_params=sum(p.numel() for p in owned),
            shape=shape,
            aliases=tuple(self.aliases),
        )


def discover_layers(model: nn.Module) -> list[LayerSpec]:
    """Layers in registration order; a tied parameter belongs to its first owner only,
    whose ``aliases`` name the other modules owning it.

    A parametrized module (``torch.nn.utils.parametrize``: ``weight_norm``,
    ``spectral_norm``, ...) owns the parameters its parametrized tensors are computed from
    (``parametrizations.weight.original0`` ...), before its own. A layer's ``params`` are
    those that require gradients now. Names are those of the eager model
    (:func:`eager_name`).
    """
    owner: dict[int, LayerSpec] = {}
    layers: list[LayerSpec] = []
    for name, module in model.named_modules(remove_duplicate=False):
        name = eager_name(name)
        mine = []
        params = list(module.parameters(recurse=False))
        if parametrize.is_parametrized(module):
            params = [*module.parametrizations.parameters(), *params]
        tied: list[LayerSpec] = []
        for p in params:
            if id(p) in owner:
                tied.append(owner[id(p)])
            else:
                mine.append(p)
        if mine:
            trainable = [p for p in mine if p.requires_grad]
            layer = LayerSpec(name, module, trainable, reg_index=len(layers), owned=mine)
            layers.append(layer)
            owner.update((id(p), layer) for p in mine)
        for first in tied:
            if first.name != name and name not in first.aliases:
                first.aliases.append(name)
    return layers


def eager_name(name: str) -> str:
    """A module name as in the eager model: without the ``_orig_mod`` component that a
    submodule compiled in place (``model.blk = torch.compile(model.blk)``) adds."""
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def order_by_first_call(layers: Sequence[LayerSpec], call_order: dict[str, int]) -> list[LayerSpec]:
    """Sort layers by the first call of themselves or, if never called, their nearest called
    ancestor below the model (so ``attn.out_proj``, used functionally, sits right after
    ``attn``); layers with neither go last."""

    def key(lay: LayerSpec) -> tuple[float, int]:
        name = lay.name
        while True:
            if name in call_order and (name or not lay.name):
                own = name == lay.name
                return (call_order[name] + (0.0 if own else 0.5), lay.reg_index)
            if not name:
                return (float("inf"), lay.reg_index)
            name = name.rpartition(".")[0]

    ordered = sorted(layers, key=key)
    for depth, lay in enumerate(ordered):
        lay.depth = depth
    return ordered


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a module output (tensor, tuple, list, dict or
    dataclass, e.g. a transformers ``ModelOutput``)."""
    if type(output) is torch.Tensor:  # the common case, without a generator (once per call)
        return output if output.is_floating_point() else None
    return next(floating_tensors(output), None)


def floating_tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module output, in order (see :func:`first_tensor`)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
        return
    if isinstance(output, (tuple, list)):
        items = list(output)
    elif isinstance(output, dict):
        items = list(output.values())
    elif is_dataclass(output) and not isinstance(output, type):
        items = [getattr(output, f.name) for f in fields(output)]
    else:
        return
    for item in items:
        yield from floating_tensors(item)
