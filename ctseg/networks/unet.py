"""The 2D U-Net (Ronneberger et al., MICCAI 2015) that all four of the study's models share.

Encoder: one stage block per entry of `features` (default 64, 128, 256, 512), each followed by
2x2 max-pooling; bottleneck block at twice the last width; decoder: 2x2 transposed conv
(stride 2, with bias) halving the width, concatenation with the skip, stage block; a final 1x1
conv (with bias) to `out_channels` logits. With DoubleConv stages, in_channels=3,
out_channels=1 and the default features this has exactly 31,037,633 parameters, the count the
study reports.

Any H, W >= 2**len(features) work: pooling floors odd sizes, and each up-sampled map is
zero-padded at its bottom/right edge (at most one row and one column) to its skip's size before
the concatenation (the Pytorch-UNet convention), so the output always has the input's H, W.

The variants only swap parts:
* `conv="spconv"` replaces every 3x3 conv inside DoubleConv by SPConv, except the very first conv,
  which lifts the 1..k-channel CT slice with a plain 3x3 conv (SPConv needs an even
  representative part >= 2, and the study found it failing on narrow inputs);
* `stage_block="conv_module"` uses ConvModule (CIE -> DoubleConv -> MFE) for the encoder stages and
  the bottleneck, where MC-Net extracts features; the decoder keeps DoubleConv, so ver5 differs
  from ver4 only in its encoder and bottleneck;
* `attention=True` gates every skip with a ResidualAttention block driven by the decoder map one
  level deeper (before its up-sampling).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import ConfigError, ModelError
from ctseg.networks.attention import ResidualAttention
from ctseg.networks.blocks import ConvFactory, DoubleConv, conv3x3
from ctseg.networks.conv_module import ConvModule
from ctseg.networks.spconv import SPConv

DEFAULT_FEATURES = (64, 128, 256, 512)
CONVS = ("plain", "spconv")
STAGE_BLOCKS = ("double_conv", "conv_module")


def _pad_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Zero-pad x at the bottom/right to ref's H, W (they differ by at most one after pooling).

    Unconditional (a zero pad is a cheap copy) so that a traced model keeps the size arithmetic
    and runs on odd sizes other than the one it was traced with.
    """
    return F.pad(x, [0, ref.shape[-1] - x.shape[-1], 0, ref.shape[-2] - x.shape[-2]])


class ConcatSkip(nn.Module):
    """The plain U-Net skip: the encoder map goes to the concatenation unchanged."""

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x


class UNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int,
                 features: Sequence[int] = DEFAULT_FEATURES, *, conv: str = "plain",
                 alpha: float = 0.5, stage_block: str = "double_conv", attention: bool = False,
                 attention_ratio: float = 0.5) -> None:
        super().__init__()
        features = tuple(features)
        if not features or any(f < 1 for f in features):
            raise ConfigError(
                f"UNet: features must be a non-empty list of positive widths, got {features}")
        if in_channels < 1 or out_channels < 1:
            raise ConfigError(f"UNet: in_channels ({in_channels}) and out_channels "
                              f"({out_channels}) must be >= 1")
        if conv not in CONVS:
            raise ConfigError(f"UNet: conv must be one of {CONVS}, got {conv!r}")
        if stage_block not in STAGE_BLOCKS:
            raise ConfigError(
                f"UNet: stage_block must be one of {STAGE_BLOCKS}, got {stage_block!r}")
        self.depth = len(features)
        self.min_size = 2 ** self.depth

        conv3: ConvFactory = partial(SPConv, alpha=alpha) if conv == "spconv" else conv3x3

        def stage(c_in: int, c_out: int, first: bool = False) -> nn.Module:
            if stage_block == "conv_module":
                return ConvModule(c_in, c_out)
            return DoubleConv(c_in, c_out, conv=conv3, first_conv=conv3x3 if first else None)

        self.encoder = nn.ModuleList()
        c_in = in_channels
        for i, f in enumerate(features):
            self.encoder.append(stage(c_in, f, first=i == 0))
            c_in = f
        self.pool = nn.MaxPool2d(2, 2)
        self.bottleneck = stage(features[-1], features[-1] * 2)

        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.gates = nn.ModuleList()
        for f in reversed(features):
            self.ups.append(nn.ConvTranspose2d(f * 2, f, kernel_size=2, stride=2))
            self.gates.append(ResidualAttention(f, f * 2, ratio=attention_ratio) if attention
                              else ConcatSkip())
            self.decoder.append(DoubleConv(f * 2, f, conv=conv3))
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.min_size or x.shape[-1] < self.min_size:
            raise ModelError(f"UNet of depth {self.depth} needs H, W >= {self.min_size}, "
                             f"got H={x.shape[-2]}, W={x.shape[-1]}")
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, gate, block in zip(self.ups, self.gates, self.decoder):
            skip = skips.pop()  # deepest first
            x = block(torch.cat((gate(skip, x), _pad_to(up(x), skip)), dim=1))
        return self.head(x)
