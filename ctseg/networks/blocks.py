"""DoubleConv, the U-Net stage block, and the small conv helpers the other blocks share.

DoubleConv is (3x3 conv -> BatchNorm -> ReLU) twice with padding 1, so H and W are kept. Convs
followed by BatchNorm carry no bias (BN's shift makes it redundant); that is what makes the
U-Net's parameter count match the study's 31,037,633. The 3x3 conv is pluggable (`conv`,
`first_conv`) so SPConv can replace it without a second copy of the block.

ReLUs are not in-place: the activation-memory estimate of `ctseg models` sums module outputs,
and in-place ops would make two modules report one buffer.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ConvFactory = Callable[[int, int], nn.Module]
"""Builds a padding-'same', stride-1 conv from (in_channels, out_channels)."""


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A plain 3x3 'same' conv without bias (it is always followed by BatchNorm)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1,
                 dilation: int = 1) -> nn.Sequential:
    """conv (no bias, 'same' padding) -> BatchNorm -> ReLU: the unit of every MFE/CIE branch."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (no bias) -> BatchNorm, no activation: the projection before a residual add."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels))


class DoubleConv(nn.Module):
    """(conv -> BN -> ReLU) x 2; `first_conv` (default `conv`) builds the first of the two convs."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory = conv3x3,
                 first_conv: ConvFactory | None = None) -> None:
        super().__init__()
        first_conv = first_conv or conv
        self.block = nn.Sequential(
            first_conv(in_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            conv(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)
