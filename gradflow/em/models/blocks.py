"""The paper's pre-activation (BN -> ReLU -> conv) blocks: simple, basic and bottleneck."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from gradflow.probes.skip import LongSkipPaths, ShortSkipPaths

BlockKind = Literal["simple", "basic", "bottleneck"]
NormLayer = Callable[[int], nn.Module]

# Per convolution: (kernel size, divisor of the block's output width).
LAYOUTS: dict[str, tuple[tuple[int, int], ...]] = {
    "simple": ((3, 1),),
    "basic": ((3, 1), (3, 1)),
    "bottleneck": ((1, 4), (3, 4), (1, 1)),
}


class Projection(nn.Conv2d):
    """A 1x1 convolution on a skip path; not counted as a main-path layer."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias)


class FCNBlock(nn.Module):
    """One pre-activation block with an optional identity (short) skip.

    Children, in execution order: ``pool`` (2x2 max-pool, when a simple / basic block
    downsamples), then per convolution ``norm{i}`` (when ``norm_layer`` is set), ``act{i}``
    and ``conv{i}``, with ``upsample`` (nearest neighbour x2) before the last convolution,
    ``drop`` on the residual path, and ``shortcut`` (a :class:`Projection`, only where the
    channel count changes). A bottleneck downsamples with a stride-2 first 1x1 convolution
    and the skip path is decimated to match.
    """

    def __init__(
        self,
        kind: BlockKind,
        in_channels: int,
        out_channels: int,
        *,
        downsample: bool = False,
        upsample: bool = False,
        short_skip: bool = True,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layout = LAYOUTS[kind]
        self.kind = kind
        self.n_convs = len(layout)
        self.has_norm = norm_layer is not None
        self.stride = 2 if downsample and kind == "bottleneck" else 1
        self.pool = nn.MaxPool2d(2) if downsample and self.stride == 1 else None
        # A bias right before the next block's BN would be redundant.
        bias = norm_layer is None
        self.upsample: nn.Module | None = None
        width = in_channels
        for i, (kernel, divisor) in enumerate(layout, start=1):
            if norm_layer is not None:
                self.add_module(f"norm{i}", norm_layer(width))
            self.add_module(f"act{i}", nn.ReLU())
            if upsample and i == self.n_convs:
                self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
            conv = nn.Conv2d(
                width,
                out_channels // divisor,
                kernel,
                stride=self.stride if i == 1 else 1,
                padding=kernel // 2,
                bias=bias,
            )
            self.add_module(f"conv{i}", conv)
            width = out_channels // divisor
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.short_skip = short_skip
        self.shortcut = (
            Projection(in_channels, out_channels, self.stride, bias)
            if short_skip and in_channels != out_channels
            else None
        )

    @property
    def last_conv(self) -> nn.Conv2d:
        """The convolution that ends the residual branch."""
        conv: nn.Conv2d = getattr(self, f"conv{self.n_convs}")
        return conv

    def skip_connections(self) -> list[ShortSkipPaths | LongSkipPaths]:
        """The short skip, for the ``skip`` probe: split after the pool (where there is
        one), the branch from its first norm (or ReLU), in the first convolution's column."""
        if not self.short_skip:
            return []
        first = self.get_submodule("norm1" if self.has_norm else "act1")
        split = self if self.pool is None else self.pool
        column = self.get_submodule("conv1")
        return [ShortSkipPaths(split, first, column, split_output=self.pool is not None)]

    def forward(self, x: Tensor) -> Tensor:
        if self.pool is not None:
            x = self.pool(x)
        out = x
        for i in range(1, self.n_convs + 1):
            if self.has_norm:
                out = getattr(self, f"norm{i}")(out)
            out = getattr(self, f"act{i}")(out)
            if self.upsample is not None and i == self.n_convs:
                out = self.upsample(out)
            out = getattr(self, f"conv{i}")(out)
        if self.drop is not None:
            out = self.drop(out)
        if self.short_skip:
            out = out + self._skip(x)
        return out

    def _skip(self, x: Tensor) -> Tensor:
        if self.shortcut is not None:
            x = self.shortcut(x)
        elif self.stride == 2:
            x = x[:, :, ::2, ::2]
        if self.upsample is not None:
            # Projecting before repeating is exact for a 1x1 conv and 4x cheaper.
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x
