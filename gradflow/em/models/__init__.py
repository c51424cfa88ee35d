"""The model zoo: preset FCNs by name (``create_model``, ``list_models``, ``model_info``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradflow.em.models.blocks import FCNBlock, Projection
from gradflow.em.models.fcn import FCN, FCNConfig, Stage
from gradflow.em.models.init import he_normal_, paper_init
from gradflow.errors import unknown_name
from gradflow.registry import Registry

__all__ = [
    "FCN",
    "FCNBlock",
    "FCNConfig",
    "Projection",
    "Stage",
    "count_convs",
    "create_model",
    "he_normal_",
    "list_models",
    "model_info",
    "paper_init",
    "register_model",
]

_MODELS: Registry[Callable[[], FCNConfig]] = Registry("model")
register_model = _MODELS.register
_FIELDS = {f.name for f in dataclasses.fields(FCNConfig)}


def create_model(name: str, **overrides: Any) -> FCN:
    """The preset ``name`` built as an :class:`FCN`, with ``overrides`` of its config fields.

    The model returns logits; the sigmoid is applied by the loss.
    """
    config = _MODELS.get(name)()
    for key in overrides:
        if key not in _FIELDS:
            raise unknown_name("FCNConfig field", key, _FIELDS)
    return FCN(dataclasses.replace(config, **overrides))


def list_models() -> list[str]:
    """Names of the preset models, in registration order."""
    return _MODELS.names()


def count_convs(model: nn.Module) -> tuple[int, int]:
    """(main path, total) numbers of ``nn.Conv2d``; 1x1 skip projections are not main path."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(not isinstance(m, Projection) for m in convs), len(convs)


def model_info(name: str) -> dict[str, Any]:
    """Name, conv layer counts (main path and total), parameter count and description."""
    with torch.device("meta"):  # counts only: no memory, no initialisation cost
        model = create_model(name)
    main, total = count_convs(model)
    return {
        "name": name,
        "conv_layers": main,
        "conv_layers_total": total,
        "n_params": sum(p.numel() for p in model.parameters()),
        "downsampling": model.config.downsampling,
        "description": _MODELS.summary(name),
    }


# Width 14 puts the 9-block model at ~147 k parameters and 249 parameter tensors (the
# benchmarks' "~148 k, ~256 tensors"); 4 pooled stages + across: input sides multiple of 32.
_FIG3_WIDTH = 14


def _fig3(repeats: int, **options: Any) -> FCNConfig:
    """4 pooled down stages, across, 4 up stages: ``repeats`` simple blocks each."""
    stage = Stage("simple", repeats, _FIG3_WIDTH)
    return FCNConfig(
        down=(stage,) * 4, across=stage, up=(stage,) * 4, stem_width=_FIG3_WIDTH, **options
    )


@register_model("paper-resunet")
def paper_resunet() -> FCNConfig:
    """The paper's very deep ResUNet: bottleneck stages, long (sum) + short skips, ~11 M params."""
    return FCNConfig(
        stem_width=32,
        down=(
            Stage("simple", 1, 32),
            Stage("simple", 1, 32),
            Stage("bottleneck", 3, 128),
            Stage("bottleneck", 8, 256),
            Stage("bottleneck", 10, 512),
        ),
        across=Stage("bottleneck", 3, 1024),
        up=(
            Stage("bottleneck", 10, 512),
            Stage("bottleneck", 8, 256),
            Stage("bottleneck", 3, 128),
            Stage("simple", 1, 32),
            Stage("simple", 1, 32),
        ),
    )


@register_model("fig3a-long-short-9")
def fig3a_long_short_9() -> FCNConfig:
    """Fig. 3(a): 9 simple blocks per stage, long (sum) and short skips, batch norm."""
    return _fig3(9)


@register_model("fig3b-long-9")
def fig3b_long_9() -> FCNConfig:
    """Fig. 3(b): 9 simple blocks per stage, only long (sum) skips, batch norm."""
    return _fig3(9, short_skip=False)


@register_model("fig3c-long-3")
def fig3c_long_3() -> FCNConfig:
    """Fig. 3(c): 3 simple blocks per stage, only long (sum) skips, batch norm."""
    return _fig3(3, short_skip=False)


@register_model("fig3d-long-7-nobn")
def fig3d_long_7_nobn() -> FCNConfig:
    """Fig. 3(d): 7 simple blocks per stage, only long (sum) skips, no batch norm."""
    return _fig3(7, short_skip=False, batch_norm=False)


@register_model("short-only-9")
def short_only_9() -> FCNConfig:
    """Control: 9 simple blocks per stage, only short skips, batch norm."""
    return _fig3(9, long_skip="none")


@register_model("no-skips-9")
def no_skips_9() -> FCNConfig:
    """Control: 9 simple blocks per stage, no long or short skips, batch norm."""
    return _fig3(9, long_skip="none", short_skip=False)


@register_model("tiny")
def tiny() -> FCNConfig:
    """For fast tests: 2 levels of 1 simple block (2 across), width 8, all skips, sides x8."""
    return FCNConfig(
        stem_width=8,
        down=(Stage("simple", 1, 8),) * 2,
        across=Stage("simple", 2, 8),
        up=(Stage("simple", 1, 8),) * 2,
    )
