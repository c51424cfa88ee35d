"""The authors' initialisation: Keras ``he_normal`` on every convolution, nothing else.

The zoo's own init (:meth:`gradflow.em.models.FCN._init_weights`) adds two things the
authors' Keras code did not have: zero-initialised residual branches and a classifier bias
at the foreground prior. :func:`paper_init` takes both away, to test whether they shape
the update figures.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The std of a unit normal truncated to [-2, 2]: Keras divides by it so that the truncated
# draw keeps the intended std.
_TRUNCATED_UNIT_STD = 0.87962566103423978


def he_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Keras' ``he_normal`` in place: a normal truncated at 2 of its std, whose std after
    truncation is ``sqrt(2 / fan_in)`` (``fan_in`` = input channels x kernel area)."""
    fan_in = weight[0].numel()
    std = math.sqrt(2.0 / fan_in) / _TRUNCATED_UNIT_STD
    return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std)


@torch.no_grad()
def paper_init(model: nn.Module) -> None:
    """Re-initialise ``model`` as the authors' Keras code did: ``he_normal`` weights and
    zero biases for every convolution (the classifier too), batch norm at weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            he_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
