"""Conformance checks for new probes and statistics: record a few steps of a small float64
model and compare each statistic in the run file with a reference the author computes from
the raw tensors in plain float64 torch.

>>> check_statistic("param/grad_norm", lambda t: sum(g.square().sum() for g in t.grads) ** 0.5)

A reference takes one recorded layer's tensors of one step (:class:`LayerTensors`, copied
from the model by hooks of the check's own, not by gradflow) and returns the statistic's
value for that layer. A check that fails raises ``AssertionError`` naming the statistic,
the step, the layer and both values.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gradflow import statistics
from gradflow.probes import PROBES
from gradflow.recorder import Recorder
from gradflow.runfile import open_run


@dataclass
class LayerTensors:
    """One layer's tensors in one training step, float64 copies.

    ``weights``, ``grads`` and ``updated`` are its trainable parameters before the optimizer
    step, their gradients and the parameters after it (in ``module.parameters()`` order);
    ``outputs`` and ``output_grads`` are the output of each of its calls in the step's
    forward pass and the gradient of the loss with respect to it.
    """

    name: str
    weights: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    updated: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    output_grads: list[torch.Tensor] = field(default_factory=list)


Reference = Callable[[LayerTensors], float]


def small_model() -> nn.Module:
    """The model checks record by default: three float64 linear layers, ReLU and tanh
    between them, inputs ``[8, 6]``."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()


def check_probe(
    probe: str,
    reference: Mapping[str, Reference],
    *,
    steps: int = 3,
    rtol: float = 1e-5,
    atol: float = 1e-12,
    model: nn.Module | None = None,
    input_shape: Sequence[int] = (8, 6),
) -> None:
    """Record ``steps`` steps with ``probe`` alone and compare every statistic registered for
    it with its reference.

    Args:
        probe: a registered probe's name.
        reference: statistic name -> the statistic of one layer's tensors in plain torch;
            one for each statistic registered for ``probe``, no others.
        steps: optimizer steps recorded (SGD with momentum, loss ``mean(model(x)^2)``).
        rtol, atol: the tolerances of ``numpy.isclose`` (run files store float32: ``rtol``
            below 1e-6 fails); NaN matches NaN.
        model: the model to train (default :func:`small_model`, float64).
        input_shape: the shape of the random float64 inputs ``x``.

    Raises:
        AssertionError: a statistic without a reference or one that differs from it.
    """
    names = statistics.names(probe)
    missing = [name for name in names if name not in reference]
    unknown = [name for name in reference if name not in names]
    if missing or unknown:
        raise AssertionError(
            f"probe {probe}: statistics {names}; no reference for {missing}, "
            f"references for statistics it does not have: {unknown}"
        )
    _check(probe, reference, steps, (rtol, atol), model, input_shape)


def check_statistic(
    key: str,
    reference: Reference,
    *,
    steps: int = 3,
    rtol: float = 1e-5,
    atol: float = 1e-12,
    model: nn.Module | None = None,
    input_shape: Sequence[int] = (8, 6),
) -> None:
    """Record ``steps`` steps with the statistic's probe alone and compare the statistic with
    ``reference``.

    Args:
        key: a registered statistic, ``PROBE/NAME`` (``"param/grad_norm"``).
        reference: the statistic of one layer's tensors in plain torch.
        steps, rtol, atol, model, input_shape: as for :func:`check_probe`.

    Raises:
        AssertionError: the recorded statistic differs from the reference.
    """
    stat = statistics.STATISTICS.get(key)
    _check(stat.probe, {stat.name: reference}, steps, (rtol, atol), model, input_shape)


def _check(
    probe: str,
    reference: Mapping[str, Reference],
    steps: int,
    tolerance: tuple[float, float],
    model: nn.Module | None,
    input_shape: Sequence[int],
) -> None:
    PROBES.get(probe)  # an unknown probe is named before anything is trained
    model = small_model() if model is None else model
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "check.h5"
        tensors = _record(model, path, probe, steps, input_shape)
        with open_run(path) as run:
            layers = run.layer_names
            recorded = {name: run.stat(probe, name).astype(np.float64) for name in reference}
            if run.steps.tolist() != list(range(steps)):
                raise AssertionError(f"{steps} steps trained, steps {run.steps} recorded")
    for name, fn in reference.items():
        expected = np.array([[float(fn(step[layer])) for layer in layers] for step in tensors])
        _compare(f"{probe}/{name}", recorded[name], expected, layers, tolerance)


def _compare(
    key: str,
    recorded: np.ndarray,
    expected: np.ndarray,
    layers: list[str],
    tolerance: tuple[float, float],
) -> None:
    rtol, atol = tolerance
    close = np.isclose(recorded, expected, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return
    step, layer = (int(i) for i in np.argwhere(~close)[0])
    raise AssertionError(
        f"{key}: step {step}, layer {layers[layer]!r}: recorded {recorded[step, layer]:.9g}, "
        f"reference {expected[step, layer]:.9g} (rtol {rtol:g}, atol {atol:g}; "
        f"{int((~close).sum())} of {close.size} values differ)"
    )


def _record(
    model: nn.Module, path: Path, probe: str, steps: int, input_shape: Sequence[int]
) -> list[dict[str, LayerTensors]]:
    """Train ``model`` for ``steps`` steps, recorded with ``probe``; each step's tensors of
    every module that owns parameters, by module name."""
    owners = {
        name: module
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    }
    current: dict[str, LayerTensors] = {}

    def keep_output(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, out: object) -> None:
            if not isinstance(out, torch.Tensor):
                return
            current[name].outputs.append(out.detach().double().clone())
            if out.requires_grad:
                out.register_hook(
                    lambda grad: current[name].output_grads.append(grad.double().clone())
                )

        return hook

    def parameters(name: str) -> list[nn.Parameter]:
        return [p for p in owners[name].parameters(recurse=False) if p.requires_grad]

    handles = [module.register_forward_hook(keep_output(n)) for n, module in owners.items()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    seen = []
    try:
        with Recorder(model, optimizer, path, probes=(probe,)) as rec:
            for _ in range(steps):
                current.clear()
                current.update((name, LayerTensors(name)) for name in owners)
                x = torch.randn(*input_shape, generator=generator, dtype=dtype)
                loss = model(x).square().mean()
                optimizer.zero_grad()
                loss.backward()
                for name, layer in current.items():
                    layer.weights = [p.detach().double().clone() for p in parameters(name)]
                    layer.grads = [
                        p.grad.double().clone() for p in parameters(name) if p.grad is not None
                    ]
                optimizer.step()
                for name, layer in current.items():
                    layer.updated = [p.detach().double().clone() for p in parameters(name)]
                rec.log(loss=loss)
                seen.append(dict(current))
    finally:
        for handle in handles:
            handle.remove()
    return seen
