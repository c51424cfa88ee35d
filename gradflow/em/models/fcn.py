"""The one configurable FCN: stem, pooled down stages, across stage, up stages, final stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch
from torch import Tensor, nn

from gradflow.em.models.blocks import LAYOUTS, BlockKind, FCNBlock, Projection
from gradflow.errors import GradflowError
from gradflow.probes.skip import LongSkipPaths, ShortSkipPaths

LongSkip = Literal["none", "sum", "concat"]
ResidualInit = Literal["zero", "he"]


@dataclass(frozen=True)
class Stage:
    """``repeats`` blocks of one kind; ``width`` is each block's output channel count."""

    block: BlockKind
    repeats: int
    width: int


@dataclass(frozen=True)
class FCNConfig:
    """Everything that defines an :class:`FCN`.

    Layout: ``down1`` is a single 3x3 convolution (the stem) at full resolution; each
    stage of ``down`` (named ``down2``, ``down3``, ...) halves the resolution at its first
    block; ``across`` halves it at its first block and doubles it at its last; each stage
    of ``up`` (``up1``, ``up2``, ...) doubles it at its last block; ``final`` (3x3 conv ->
    BN -> ReLU, ``stem_width`` channels) and the 1x1 ``classifier`` run at full resolution.
    Long skips go from each down stage's output (the stem included) to the input of the
    up stage (or ``final``) at the same resolution: ``sum`` adds them, first bringing the
    up-path tensor to the skip's width with a 1x1 :class:`Projection` where they differ
    (as the authors' code does); ``concat`` stacks the channels; ``none`` drops them.
    ``residual_init="zero"`` starts every block that has a short skip as the identity;
    ``prior`` is the foreground fraction the classifier bias starts at.
    """

    down: tuple[Stage, ...]
    across: Stage
    up: tuple[Stage, ...]
    stem_width: int = 32
    long_skip: LongSkip = "sum"
    short_skip: bool = True
    batch_norm: bool = True
    dropout: float = 0.1
    residual_init: ResidualInit = "zero"
    prior: float = 0.22
    in_channels: int = 1
    out_channels: int = 1

    def __post_init__(self) -> None:
        if len(self.up) != len(self.down):
            raise GradflowError(
                f"the FCN needs as many up stages as down stages, got {len(self.up)} up "
                f"and {len(self.down)} down"
            )
        for stage in (*self.down, self.across, *self.up):
            if stage.block not in LAYOUTS:
                raise GradflowError(f"unknown block {stage.block!r} (known: {', '.join(LAYOUTS)})")
            if stage.repeats < 1 or stage.width < 1:
                raise GradflowError(f"a stage needs repeats >= 1 and width >= 1, got {stage}")
            if stage.block == "bottleneck" and stage.width % 4:
                raise GradflowError(f"a bottleneck width must be a multiple of 4, got {stage}")
        _check_choice("long_skip", self.long_skip, LongSkip)
        _check_choice("residual_init", self.residual_init, ResidualInit)
        if not 0 <= self.dropout < 1:
            raise GradflowError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.prior < 1:
            raise GradflowError(f"prior must be in (0, 1), got {self.prior}")

    @property
    def downsampling(self) -> int:
        """The total downsampling factor; input sides must be multiples of it."""
        return 2 ** (len(self.down) + 1)


def _check_choice(name: str, value: object, choices: object) -> None:
    if value not in get_args(choices):
        known = ", ".join(repr(c) for c in get_args(choices))
        raise GradflowError(f"{name} must be one of {known}, got {value!r}")


def _last_main_conv(stage: nn.Module) -> nn.Module:
    return [m for m in stage.modules() if type(m) is nn.Conv2d][-1]


def _nearest(side: int, factor: int) -> tuple[int, int]:
    """The valid sizes just below and just above ``side`` (``side`` itself when valid)."""
    if side > 0 and side % factor == 0:
        return side, side
    below = side // factor * factor
    return max(below, factor), below + factor


class FCN(nn.Module):
    """A U-Net-shaped FCN with configurable blocks, long skips and short skips.

    Returns **logits** of shape ``(N, out_channels, H, W)``: the sigmoid belongs to the loss
    (e.g. ``BCEWithLogits`` or a Dice loss on ``sigmoid(logits)``), which keeps it stable.
    Submodules are named ``down1.conv``, ``down4.2.conv2``, ``across.0``, ``up1.3``,
    ``long_skips.up1``, ``final.conv``, ``classifier``.
    """

    def __init__(self, config: FCNConfig) -> None:
        super().__init__()
        self.config = config
        norm = nn.BatchNorm2d if config.batch_norm else None
        self.down1 = nn.Sequential()
        self.down1.add_module(
            "conv",
            nn.Conv2d(config.in_channels, config.stem_width, 3, padding=1, bias=norm is None),
        )
        widths = [config.stem_width]
        for k, stage in enumerate(config.down, start=2):
            self.add_module(f"down{k}", self._stage(stage, widths[-1], down=True))
            widths.append(stage.width)
        self.across = self._stage(config.across, widths[-1], down=True, up=True)

        self.long_skips = nn.ModuleDict()
        width = config.across.width
        targets = [f"up{k}" for k in range(1, len(config.up) + 1)] + ["final"]
        for name, up_stage, skip_width in zip(
            targets, (*config.up, None), reversed(widths), strict=True
        ):
            width = self._add_long_skip(name, skip_width, width)
            if up_stage is not None:
                self.add_module(name, self._stage(up_stage, width, up=True))
                width = up_stage.width
        self.final = nn.Sequential()
        self.final.add_module(
            "conv", nn.Conv2d(width, config.stem_width, 3, padding=1, bias=norm is None)
        )
        if norm is not None:
            self.final.add_module("norm", norm(config.stem_width))
        self.final.add_module("act", nn.ReLU())
        self.classifier = nn.Conv2d(config.stem_width, config.out_channels, 1)
        self._down_names = ["down1", *(f"down{k}" for k in range(2, len(config.down) + 2))]
        self._up_names = targets
        self._init_weights()

    def _stage(
        self, stage: Stage, in_channels: int, *, down: bool = False, up: bool = False
    ) -> nn.Sequential:
        """``stage.repeats`` blocks; the first one downsamples, the last one upsamples."""
        config = self.config
        return nn.Sequential(
            *(
                FCNBlock(
                    stage.block,
                    in_channels if i == 0 else stage.width,
                    stage.width,
                    downsample=down and i == 0,
                    upsample=up and i == stage.repeats - 1,
                    short_skip=config.short_skip,
                    norm_layer=nn.BatchNorm2d if config.batch_norm else None,
                    dropout=config.dropout,
                )
                for i in range(stage.repeats)
            )
        )

    def _add_long_skip(self, target: str, skip_width: int, width: int) -> int:
        """Registers the long skip into ``target``; returns the merged channel count."""
        mode = self.config.long_skip
        if mode == "concat":
            return width + skip_width
        if mode == "sum" and skip_width != width:
            # As in the authors' fcn_maker: the up-path tensor is brought to the skip's width.
            self.long_skips[target] = Projection(width, skip_width, bias=not self.config.batch_norm)
            return skip_width
        return width

    def skip_connections(self) -> list[ShortSkipPaths | LongSkipPaths]:
        """The long skips, for the ``skip`` probe: each encoder stage's output, taken by the
        stage below it (the next down stage or ``across``) and by the up stage (or
        ``final``) whose input the skip joins, in the column of the encoder stage's last
        main-path convolution; none where ``long_skip`` is ``"none"``."""
        if self.config.long_skip == "none":
            return []
        below = [*self._down_names[1:], "across"]
        return [
            LongSkipPaths(
                getattr(self, under),
                getattr(self, target),
                _last_main_conv(getattr(self, source)),
                concat=self.config.long_skip == "concat",
            )
            for source, under, target in zip(
                self._down_names, below, reversed(self._up_names), strict=True
            )
        ]

    def check_input_size(self, height: int, width: int) -> None:
        """Raises :class:`GradflowError` unless ``height x width`` can go through the model."""
        factor = self.config.downsampling
        if height % factor == 0 and width % factor == 0 and height > 0 and width > 0:
            return
        (h_low, h_high), (w_low, w_high) = (_nearest(side, factor) for side in (height, width))
        if height == width:
            sizes = [str(h_low), str(h_high)]
        else:
            sizes = [f"{h_low}x{w_low}", f"{h_high}x{w_high}"]
        hint = " or ".join(dict.fromkeys(sizes))
        raise GradflowError(
            f"input {height}x{width} is not a multiple of {factor}, the model's total "
            f"downsampling; use e.g. {hint}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise GradflowError(
                f"expected input (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        self.check_input_size(x.shape[2], x.shape[3])
        skips = []
        for name in self._down_names:
            x = getattr(self, name)(x)
            skips.append(x)
        x = self.across(x)
        for name in self._up_names:
            x = self._merge(name, x, skips.pop())
            x = getattr(self, name)(x)
        return self.classifier(x)

    def _merge(self, target: str, x: Tensor, skip: Tensor) -> Tensor:
        mode = self.config.long_skip
        if mode == "concat":
            return torch.cat([x, skip], dim=1)
        if mode == "sum":
            if target in self.long_skips:
                x = self.long_skips[target](x)
            return x + skip
        return x

    def _init_weights(self) -> None:
        """He init for convolutions; identity-like residual blocks; classifier at the prior.

        Why (the paper.md pitfall: a long + short model with 9 blocks per stage sat on a
        plateau under Dice loss + RMSprop): with ``residual_init="zero"`` the last convolution
        of every block with a short skip starts at zero, so each block starts as the
        identity, the residual stream does not grow with the number of summed blocks and the
        deep model starts as a shallow one. The classifier bias starts at the log-odds of
        ``prior`` (~0.22 membrane on ISBI 2012), so the sigmoid starts at the base rate,
        far from saturation.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.config.residual_init == "zero":
            for module in self.modules():
                if isinstance(module, FCNBlock) and module.short_skip:
                    nn.init.zeros_(module.last_conv.weight)
        nn.init.kaiming_normal_(self.classifier.weight, nonlinearity="linear")
        prior = self.config.prior
        nn.init.constant_(cast(Tensor, self.classifier.bias), math.log(prior / (1 - prior)))
