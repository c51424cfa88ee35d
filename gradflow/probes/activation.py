"""The ``activation`` probe: each recorded layer's output in training forwards."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from gradflow.kernels import CALL_COLUMNS
from gradflow.probes.base import Check, register
from gradflow.probes.calls import CallLog, CallProbe


@register
class ActivationProbe(CallProbe):
    """Sum, sum of squares, nonzero and non-finite entries of each layer output (the
    first floating-point tensor it returns); a layer output computed again during
    backward (activation checkpointing) is not counted again."""

    name = "activation"
    columns = CALL_COLUMNS

    def on_output(self, out: torch.Tensor, log: CallLog, layer_id: int, forward: bool) -> None:
        if forward:
            self.reduce(out, log, layer_id)

    @classmethod
    def nonfinite(cls, reductions: Mapping[str, np.ndarray]) -> list[Check]:
        return [Check(1, "output", reductions["nonfinite"][0] > 0)]
