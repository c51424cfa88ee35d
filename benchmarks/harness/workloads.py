"""The training workloads every script times: a zoo FCN or a third-party model (RMSprop, one
fixed random batch), and a plain MLP."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .tools import Tool, Unavailable


@dataclass(frozen=True)
class Workload:
    """A model trained with RMSprop on one fixed random batch: a zoo FCN (BCE on a
    ``crop`` x ``crop`` image) or a third-party model of :data:`THIRD_PARTY`."""

    model: str = "fig3b-long-9"
    crop: int = 96
    batch: int = 4
    device: str = "cpu"
    lr: float = 1e-4
    seed: int = 0
    autocast: bool = False  # forward under torch.autocast (bfloat16 on the CPU)

    def describe(self) -> str:
        cast = ", autocast bfloat16" if self.autocast else ""
        if self.model in THIRD_PARTY:
            what = THIRD_PARTY[self.model].describe(self)
            return f"{self.model}, {what}, RMSprop{cast}, {self.device}"
        return (
            f"{self.model}, batch {self.batch} x {self.crop}x{self.crop}, RMSprop, "
            f"BCE-with-logits, random inputs{cast}, {self.device}"
        )


LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Task = tuple[nn.Module, torch.Tensor, torch.Tensor, LossFn]  # model, inputs, targets, loss


class _BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18_like(num_classes: int = 10) -> nn.Module:
    """ResNet-18's layout in pure torch (torchvision's module names: ``conv1``,
    ``layer1.0.conv1``, ..., ``fc``): 7x7 stem, four stages of two basic blocks."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", nn.Conv2d(3, 64, 7, 2, 3, bias=False)),
        ("bn1", nn.BatchNorm2d(64)),
        ("relu", nn.ReLU()),
        ("maxpool", nn.MaxPool2d(3, 2, 1)),
    ]
    c_in = 64
    for i, width in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        stage = nn.Sequential(_BasicBlock(c_in, width, stride), _BasicBlock(width, width, 1))
        layers.append((f"layer{i + 1}", stage))
        c_in = width
    layers += [
        ("avgpool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(512, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


@dataclass(frozen=True)
class ThirdParty:
    """A model built from pure torch or a transformers config, with its batch and loss:
    ``build(workload, generator) -> (model, x, y, loss_fn)``."""

    describe: Callable[[Workload], str]
    build: Callable[[Workload, torch.Generator], Task]


def _resnet18(workload: Workload, gen: torch.Generator) -> Task:
    x = torch.randn((workload.batch, 3, workload.crop, workload.crop), generator=gen)
    y = torch.randint(0, 10, (workload.batch,), generator=gen)
    return resnet18_like(10), x, y, nn.CrossEntropyLoss()


def _resnet18_channels_last(workload: Workload, gen: torch.Generator) -> Task:
    model, x, y, loss = _resnet18(workload, gen)
    layout = torch.channels_last
    return model.to(memory_format=layout), x.to(memory_format=layout), y, loss  # type: ignore[call-overload]


GPT2_MINI: dict[str, Any] = {"n_layer": 6, "n_embd": 256, "n_head": 4, "vocab_size": 4096}


def _gpt2_mini(workload: Workload, gen: torch.Generator) -> Task:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise Unavailable(f"needs transformers ({err}); pip install transformers") from err
    config = GPT2Config(
        n_positions=max(workload.crop, 16),
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
        **GPT2_MINI,
    )
    tokens = torch.randint(0, config.vocab_size, (workload.batch, workload.crop + 1), generator=gen)

    def next_token_loss(out: Any, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())

    return GPT2LMHeadModel(config), tokens[:, :-1], tokens[:, 1:], next_token_loss


THIRD_PARTY = {
    "resnet18": ThirdParty(
        lambda w: (
            f"ResNet-18-like CNN (pure torch), batch {w.batch} x 3x{w.crop}x{w.crop}, "
            "10-class cross-entropy"
        ),
        _resnet18,
    ),
    "resnet18-cl": ThirdParty(
        lambda w: (
            f"ResNet-18-like CNN (pure torch) in channels-last layout, batch {w.batch} x "
            f"3x{w.crop}x{w.crop}, 10-class cross-entropy"
        ),
        _resnet18_channels_last,
    ),
    "gpt2-mini": ThirdParty(
        lambda w: (
            "GPT-2 from a transformers config ("
            + ", ".join(f"{k}={v}" for k, v in GPT2_MINI.items())
            + f"), batch {w.batch} x {w.crop} tokens, next-token cross-entropy"
        ),
        _gpt2_mini,
    ),
}


class Trainer:
    """One training step at a time; every Trainer of a workload starts from the same weights."""

    def __init__(self, workload: Workload) -> None:
        from gradflow.em.models import create_model

        self.workload = workload
        device = torch.device(workload.device)
        torch.manual_seed(workload.seed)
        gen = torch.Generator().manual_seed(workload.seed + 1)
        self.loss_fn: LossFn
        if workload.model in THIRD_PARTY:
            model, x, y, self.loss_fn = THIRD_PARTY[workload.model].build(workload, gen)
        else:
            model = create_model(workload.model)
            self.loss_fn = nn.BCEWithLogitsLoss()
            shape = (workload.batch, 1, workload.crop, workload.crop)
            x = torch.randn(shape, generator=gen)
            y = (torch.rand(shape, generator=gen) < 0.3).float()
        self.model: nn.Module = model.to(device)
        self.model.train()
        self.optimizer: torch.optim.Optimizer = torch.optim.RMSprop(
            self.model.parameters(), lr=workload.lr
        )
        self.x, self.y = x.to(device), y.to(device)
        self.step_index = 0

    def step(self, tool: Tool) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.x.device.type, enabled=self.workload.autocast):
            out = self.model(self.x)
        loss = self.loss_fn(out.float() if isinstance(out, torch.Tensor) else out, self.y)
        tool.backward(out, loss)
        self.optimizer.step()
        tool.after_step(loss)
        self.step_index += 1
        return loss


class MLPTrainer:
    """``n_layers`` Linear(width, width) layers in a row (+ ReLU if ``relu``), SGD, MSE, one
    fixed random batch. Near-identity initial weights keep even 1000 layers finite. The first
    ``frozen`` layers do not train (no gradients, not in the optimizer)."""

    def __init__(
        self,
        n_layers: int,
        *,
        width: int = 16,
        batch: int = 8,
        relu: bool = False,
        frozen: int = 0,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)
        blocks: list[nn.Module] = []
        for _ in range(n_layers):
            linear = nn.Linear(width, width)
            with torch.no_grad():
                linear.weight.copy_(torch.eye(width) + 0.01 * torch.randn(width, width))
                linear.bias.zero_()
            blocks += [linear, nn.ReLU()] if relu else [linear]
        self.model: nn.Module = nn.Sequential(*blocks)
        for block in blocks[: (2 if relu else 1) * frozen]:
            block.requires_grad_(False)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer = torch.optim.SGD(trainable, lr=lr)
        self.x = torch.randn(batch, width)
        self.y = torch.randn(batch, width)
        self.step_index = 0

    def step(self, tool: Tool) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(self.x)
        loss = nn.functional.mse_loss(out, self.y)
        tool.backward(out, loss)
        self.optimizer.step()
        tool.after_step(loss)
        self.step_index += 1
        return loss
