"""The Ignite handler (and MONAI's SupervisedTrainer, an Ignite engine) against a float64 replay.

The reference never touches gradflow or the engine: it copies the model's initial weights
into a float64 model, runs the same batches through it with plain autograd (the loss of each
micro-batch divided by the accumulation count, as the engines do), applies SGD with momentum
by hand, and computes every statistic in float64 numpy. The engine trains in float32, so
statistics match to rtol 1e-5 over these few steps (measured: at most 4e-7), and to atol 1e-7
for values near zero: a PReLU's one-element update of 1e-5 on a weight of 0.25 is rounded to
float32's steps of 3e-8 there (its relative error reaches 4e-4).
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradflow import GradflowError, Recorder, open_run

ignite_engine = pytest.importorskip("ignite.engine")
from gradflow.integrations.ignite import GradflowHandler  # noqa: E402

RTOL = 1e-5
ATOL = 1e-7
LR, MOMENTUM = 0.1, 0.9
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Replay:
    """A float64 copy of a model, trained by hand with SGD + momentum on given batches."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    stats: list[dict[str, dict[str, float]]] = field(default_factory=list)  # step, stat, layer
    losses: list[float] = field(default_factory=list)  # per optimizer step: micro-batch mean
    _buffers: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> Replay:
        return cls(copy.deepcopy(model).double(), loss_fn)

    def layers(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by the module that directly owns them."""
        return {
            name: own
            for name, module in self.model.named_modules()
            if (own := list(module.parameters(recurse=False)))
        }

    def step(self, batches: Sequence[Batch], divide_by: int) -> None:
        """One optimizer step over ``batches`` (micro-batches), each loss divided by
        ``divide_by`` before its backward pass."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        losses = []
        for x, y in batches:
            loss = self.loss_fn(self.model(x.double()), y.double())
            (loss / divide_by).backward()
            losses.append(loss.item())
        self.losses.append(float(np.mean(losses)))
        row: dict[str, dict[str, float]] = {}
        with torch.no_grad():
            for name, params in self.layers().items():
                w = np.concatenate([p.numpy().ravel() for p in params])
                g = np.concatenate([p.grad.numpy().ravel() for p in params])
                for p in params:
                    buf = self._buffers.get(id(p))
                    buf = p.grad.clone() if buf is None else buf.mul_(MOMENTUM).add_(p.grad)
                    self._buffers[id(p)] = buf
                    p.sub_(LR * buf)
                d = np.concatenate([p.numpy().ravel() for p in params]) - w
                for key, value in {
                    "weight_norm": np.linalg.norm(w),
                    "grad_norm": np.linalg.norm(g),
                    "update_norm": np.linalg.norm(d),
                    "update_abs_mean": np.abs(d).mean(),
                }.items():
                    row.setdefault(key, {})[name] = float(value)
        self.stats.append(row)

    def assert_matches(self, path: Path) -> None:
        """The run file's rows and losses equal the replay's steps."""
        run = open_run(path)
        np.testing.assert_array_equal(run.steps, np.arange(len(self.stats)))
        assert sorted(run.layer_names) == sorted(self.layers())
        for key in self.stats[0]:
            want = [[row[key][name] for name in run.layer_names] for row in self.stats]
            got = run.stat("param", key)
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=key)
        np.testing.assert_allclose(run.loss, self.losses, rtol=RTOL)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n: int, seed: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ignite_supervised_trainer(accumulation: int, tmp_path: Path, one_thread: None) -> None:
    """``create_supervised_trainer`` with and without gradient accumulation; 5 iterations
    an epoch, so with accumulation 2 one step spans the epoch boundary (Ignite counts
    iterations over the whole run). Epoch ends carry the trainer's own metric and a
    validation evaluator's, which runs in an epoch-completed handler attached later."""
    from ignite.metrics import Average, MeanSquaredError

    model, data, val = _mlp(), _batches(5), _batches(2, seed=2)
    replay = Replay.of(model, nn.functional.mse_loss)
    optimizer = _sgd(model)
    trainer = ignite_engine.create_supervised_trainer(
        model, optimizer, nn.MSELoss(), gradient_accumulation_steps=accumulation
    )
    Average(output_transform=lambda loss: torch.tensor(loss)).attach(trainer, "mean_loss")
    evaluator = ignite_engine.create_supervised_evaluator(
        model, metrics={"val_mse": MeanSquaredError()}
    )
    path = tmp_path / "run.h5"
    GradflowHandler(path).attach(trainer, model, optimizer, metrics_from=evaluator)
    outputs: list[float] = []
    trainer.add_event_handler(
        ignite_engine.Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output)
    )
    trainer.add_event_handler(ignite_engine.Events.EPOCH_COMPLETED, lambda: evaluator.run(val))
    trainer.run(data, max_epochs=2)

    def val_mse() -> float:
        with torch.no_grad():
            squares = [(replay.model(x.double()) - y.double()) ** 2 for x, y in val]
        return torch.cat(squares).sum(1).mean().item()  # Ignite's: summed over outputs

    stream = data * 2
    val_after = [val_mse()]  # after 0, 1, ... optimizer steps
    for start in range(0, len(stream), accumulation):
        replay.step(stream[start : start + accumulation], divide_by=accumulation)
        val_after.append(val_mse())
    replay.assert_matches(path)
    run = open_run(path)
    # Ignite outputs each micro-batch's undivided loss: the row's loss is their mean.
    np.testing.assert_allclose(run.loss, np.reshape(outputs, (-1, accumulation)).mean(1))
    np.testing.assert_array_equal(run.epochs, [0, 1])
    np.testing.assert_array_equal(run.epoch_end_step, [5 // accumulation, 10 // accumulation])
    epoch_means = np.reshape(outputs, (2, 5)).mean(1)
    np.testing.assert_allclose(run.metrics["mean_loss"], epoch_means, rtol=RTOL)
    # Each evaluation saw the weights of the steps completed by the epoch's end.
    want = [val_after[5 // accumulation], val_after[10 // accumulation]]
    np.testing.assert_allclose(run.metrics["val_mse"], want, rtol=RTOL)


def test_ignite_custom_output_and_non_numbers(tmp_path: Path, one_thread: None) -> None:
    """A process function returning a dict, an ``output_transform`` picking its loss tensor,
    metrics that are not numbers left out of the epoch ends."""
    model, data = _mlp(), _batches(3)
    replay = Replay.of(model, nn.functional.mse_loss)
    optimizer = _sgd(model)

    def update(engine: Any, batch: Batch) -> dict[str, Any]:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return {"objective": loss, "note": "text"}

    trainer = ignite_engine.Engine(update)

    @trainer.on(ignite_engine.Events.EPOCH_COMPLETED)
    def metrics(engine: Any) -> None:
        engine.state.metrics.update(
            score=0.5, count=np.int64(3), flag=True, matrix=torch.eye(2), name="x"
        )

    handler = GradflowHandler(tmp_path / "run.h5", output_transform=lambda o: o["objective"])
    assert handler.attach(trainer, model, optimizer) is handler
    trainer.run(data, max_epochs=1)
    for start in range(3):
        replay.step(data[start : start + 1], divide_by=1)
    replay.assert_matches(tmp_path / "run.h5")
    run = open_run(tmp_path / "run.h5")
    assert sorted(run.metrics) == ["count", "score"]
    np.testing.assert_array_equal(run.metrics["count"], [3])


def test_ignite_output_without_a_loss_is_refused(tmp_path: Path) -> None:
    model, data = _mlp(), _batches(2)
    optimizer = _sgd(model)
    trainer = ignite_engine.Engine(lambda engine, batch: {"pred": model(batch[0])})
    GradflowHandler(tmp_path / "run.h5").attach(trainer, model, optimizer)
    with pytest.raises(GradflowError, match="no loss in the engine's output"):
        trainer.run(data, max_epochs=1)
    with pytest.raises(GradflowError, match="ignite Engine"):
        GradflowHandler(tmp_path / "x.h5").attach(object(), model, optimizer)  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["iteration", "epoch_end"])
def test_ignite_closes_the_file_when_training_raises(where: str, tmp_path: Path) -> None:
    model, data = _mlp(), _batches(3)
    optimizer = _sgd(model)
    trainer = ignite_engine.create_supervised_trainer(model, optimizer, nn.MSELoss())
    GradflowHandler(tmp_path / "run.h5").attach(trainer, model, optimizer)

    def fail(engine: Any) -> None:
        if where == "epoch_end" or engine.state.iteration == 5:
            raise RuntimeError("stop here")

    event = ignite_engine.Events
    trainer.add_event_handler(
        event.ITERATION_COMPLETED if where == "iteration" else event.EPOCH_COMPLETED, fail
    )
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.run(data, max_epochs=3)
    run = open_run(tmp_path / "run.h5")
    if where == "iteration":  # the first epoch and two steps of the second
        np.testing.assert_array_equal(run.steps, np.arange(5))
        np.testing.assert_array_equal(run.epoch_end_step, [3])
    else:  # the epoch whose end raised is there, without metrics
        np.testing.assert_array_equal(run.steps, np.arange(3))
        np.testing.assert_array_equal(run.epoch_end_step, [3])
    # Every hook is gone: the same model takes a new Recorder.
    Recorder(model, None, tmp_path / "again.h5").close()


# -- MONAI ----------------------------------------------------------------------------------------
@pytest.mark.slow  # importing monai takes 10-40 s here; the training itself about 1 s
def test_monai_supervised_trainer(tmp_path: Path, one_thread: None) -> None:
    """A 2-D MONAI UNet (convolutions, PReLU, instance norm, a residual unit) trained by
    ``SupervisedTrainer`` with Dice loss and accumulation 2 over epochs of 5 batches: each
    epoch's last step has one micro-batch (MONAI flushes it, its loss still divided by 2)."""
    pytest.importorskip("monai", minversion="1.6")  # SupervisedTrainer(accumulation_steps=)
    from monai.engines import SupervisedTrainer
    from monai.losses import DiceLoss
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,),
        num_res_units=1,
    )  # fmt: skip
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(2, 1, 16, 16, generator=g) for _ in range(5)]
    labels = [(torch.rand(2, 1, 16, 16, generator=g) > 0.5).float() for _ in range(5)]
    loss_fn = DiceLoss(sigmoid=True)
    replay = Replay.of(net, loss_fn)
    optimizer = _sgd(net)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=[{"image": x, "label": y} for x, y in zip(images, labels, strict=True)],
        network=net,
        optimizer=optimizer,
        loss_function=loss_fn,
        accumulation_steps=2,
    )
    GradflowHandler(tmp_path / "run.h5").attach(trainer, net, optimizer)
    trainer.run()

    batches = list(zip(images, labels, strict=True))
    for _ in range(2):
        for group in (batches[0:2], batches[2:4], batches[4:5]):
            replay.step(group, divide_by=2)
    replay.assert_matches(tmp_path / "run.h5")
    run = open_run(tmp_path / "run.h5")
    assert "model.1.submodule.conv.unit0.adn.A" in run.layer_names  # a PReLU owns a weight
    np.testing.assert_array_equal(run.epoch_end_step, [3, 6])
    assert run.config["integration"] == "ignite"
    assert run.config["accumulation_steps"] == 2


def test_without_ignite_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ignite", "ignite.engine"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ignite` fails
    monkeypatch.delitem(sys.modules, "gradflow.integrations.ignite")
    with pytest.raises(GradflowError, match=r"^gradflow.integrations.ignite needs PyTorch Ignite"):
        importlib.import_module("gradflow.integrations.ignite")
