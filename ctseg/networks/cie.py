"""CIE: context information extraction, after MC-Net (Xia et al., Applied Intelligence 2021).

Three parallel 3x3 convs with dilation 2, 6 and 10 (padding = dilation, so H and W are kept)
each keep C channels and see 5x5, 13x13 and 21x21 neighbourhoods; their 3C outputs are
concatenated, a 1x1 conv fuses them back to C, and the input is added (residual).

Choices the paper leaves open, taken here (the same as in MFE): each dilated conv is
conv -> BatchNorm -> ReLU; the 1x1 fusion is conv -> BatchNorm without ReLU; nothing follows the
residual add.

`ThesisCIE` is the block as the study builds it (its ver5 parameter count, 77,414,275, holds
only so): the same three dilated convs and 1x1 fusion, each conv with a bias and no BatchNorm.
The count leaves no room for activation layers; the dilated convs are followed by a functional
ReLU (MC-Net's branches are non-linear, and F.relu has no parameters).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.networks.blocks import conv_bn, conv_bn_relu

DILATIONS = (2, 6, 10)


class CIE(nn.Module):
    def __init__(self, channels: int, dilations: Sequence[int] = DILATIONS) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            conv_bn_relu(channels, channels, 3, dilation=d) for d in dilations)
        self.fuse = conv_bn(channels * len(self.branches), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for branch in self.branches:
            outputs.append(branch(x))
        return x + self.fuse(torch.cat(outputs, dim=1))


class ThesisCIE(nn.Module):
    def __init__(self, channels: int, dilations: Sequence[int] = DILATIONS) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in dilations)
        self.fuse = nn.Conv2d(channels * len(self.branches), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        for branch in self.branches:
            outputs.append(F.relu(branch(x)))
        return x + self.fuse(torch.cat(outputs, dim=1))
