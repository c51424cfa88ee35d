"""``gradflow.testing``: gradflow's own probes pass its checks against references written
here in plain float64 torch, and a wrong reference, a missing one or an unknown statistic
fails with a message that says where."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradflow.errors import GradflowError
from gradflow.testing import LayerTensors, check_probe, check_statistic

pytestmark = pytest.mark.usefixtures("one_thread")


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def update(t: LayerTensors) -> torch.Tensor:
    return flat(t.updated) - flat(t.weights)


PARAM = {
    "update_norm": lambda t: update(t).norm(),
    "update_ratio": lambda t: update(t).norm() / flat(t.weights).norm(),
    "update_abs_mean": lambda t: update(t).abs().mean(),
    "update_abs_max": lambda t: update(t).abs().max(),
    "weight_norm": lambda t: flat(t.weights).norm(),
    "grad_norm": lambda t: flat(t.grads).norm(),
    "grad_update_cos": lambda t: (
        torch.dot(flat(t.grads), update(t)) / (flat(t.grads).norm() * update(t).norm())
    ),
    "grad_nonfinite": lambda t: (~torch.isfinite(flat(t.grads))).sum(),
}
ACTIVATION = {
    "mean": lambda t: flat(t.outputs).mean(),
    "std": lambda t: flat(t.outputs).std(correction=0),
    "zero_fraction": lambda t: (flat(t.outputs) == 0).double().mean(),
    "nonfinite": lambda t: (~torch.isfinite(flat(t.outputs))).sum(),
}
GRAD_OUTPUT = {
    "norm": lambda t: flat(t.output_grads).norm(),
    "rms": lambda t: flat(t.output_grads).square().mean().sqrt(),
}


def with_zeros() -> nn.Module:
    """A layer that owns a parameter and outputs exact zeros: PReLU with slope 0 at first."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.PReLU(init=0.0), nn.Linear(16, 3)).double()


def test_param_passes() -> None:
    check_probe("param", PARAM)


def test_activation_passes_on_outputs_with_zeros() -> None:
    model = with_zeros()
    with torch.no_grad():  # the check would not show zero_fraction if there were none
        assert (model[1](model[0](torch.randn(8, 6, dtype=torch.float64))) == 0).any()
    check_probe("activation", ACTIVATION, model=model)


def test_grad_output_passes() -> None:
    check_probe("grad_output", GRAD_OUTPUT, steps=4)


class SecondHalf(nn.Module):
    """A layer whose output is the second output of a two-output autograd node (split):
    the gradient is read from the node's pre-hook at that output's index."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, 2 * n, dtype=torch.float64) / n**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight).chunk(2, dim=1)[1]


def test_grad_output_of_a_multi_output_node_and_an_output_changed_in_place() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(inplace=True),  # changes the first layer's output after its hook ran
        SecondHalf(16),
        nn.Linear(16, 3),
    ).double()
    check_probe("grad_output", GRAD_OUTPUT, model=model, steps=3)


def test_a_wrong_reference_fails_naming_where() -> None:
    wrong = {**GRAD_OUTPUT, "rms": lambda t: 1.0001 * GRAD_OUTPUT["rms"](t)}
    with pytest.raises(AssertionError, match=r"grad_output/rms: step 0, layer '0': recorded .*"
                       r"reference .*rtol 1e-05.*; 9 of 9 values differ"):  # fmt: skip
        check_probe("grad_output", wrong)


def test_the_tolerance_is_the_stated_one() -> None:
    # 1e-4 off: outside rtol 1e-5, inside rtol 1e-3.
    off = lambda t: 1.0001 * PARAM["weight_norm"](t)  # noqa: E731
    with pytest.raises(AssertionError, match="param/weight_norm"):
        check_statistic("param/weight_norm", off, steps=1)
    check_statistic("param/weight_norm", off, steps=1, rtol=1e-3)


def test_every_statistic_needs_a_reference() -> None:
    partial = {k: v for k, v in PARAM.items() if k != "grad_norm"}
    with pytest.raises(AssertionError, match=r"no reference for \['grad_norm'\]"):
        check_probe("param", partial)
    with pytest.raises(AssertionError, match=r"does not have: \['median'\]"):
        check_probe("grad_output", {**GRAD_OUTPUT, "median": GRAD_OUTPUT["rms"]})


def test_unknown_names_are_gradflow_errors() -> None:
    with pytest.raises(GradflowError, match="unknown statistic 'param/grad_nrom'"):
        check_statistic("param/grad_nrom", PARAM["grad_norm"])
    with pytest.raises(GradflowError, match="unknown probe 'parma'"):
        check_probe("parma", {})
