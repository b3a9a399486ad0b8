"""MFE: multi-scale feature extraction, after MC-Net (Xia et al., Applied Intelligence 2021).

Four Inception-style branches see the same input and produce 1/4, 1/8, 1/2 and the remaining
(~1/8) of the working width C' = max(C, 8):

    1x1 | 3x3 max-pool (stride 1, pad 1) -> 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3

(two stacked 3x3 see 5x5). The branches are concatenated back to C' channels, a 1x1 "smooth"
conv maps them to C and the input is added (residual), so the block keeps shape and can be
dropped after any stage. When C < 8 a 1x1 conv first lifts the input to 8 channels so that every
branch has at least one channel.

Choices taken here:
* the shares are each branch's *output* width (Inception): every branch sees all C' channels,
  which is what lets the 1x1 reductions mix them. The study instead splits the *input*
  channels among the branches (`SplitMFE` below, the thesis variant), so each branch sees a
  quarter, an eighth or a half of them;
* in a "1x1 -> 3x3" branch the 1x1 reduces straight to the branch's share and the 3x3 keep it;
* every branch conv (and the lift) is conv -> BatchNorm -> ReLU, as in BN-Inception;
* the smooth conv is conv -> BatchNorm without ReLU, and nothing follows the residual add, so the
  identity path stays linear (pre-activation ResNet argument) and the block starts as a
  near-identity.

`SplitMFE` is the block as the study builds it (the thesis variant; its ver5 count holds only
so): `torch.split` divides the *input* channels into 1/4, 1/8, 1/2 and the remaining 1/8, one part
per branch, each branch keeps its part's width, the outputs are concatenated back to C, and the
fusing smoothConv1x1 maps them to ONE channel that is added to every input channel. Every conv
has a bias and no BatchNorm; the branch convs are followed by a functional ReLU (no layer, no
parameter). C must be >= 8 so that every branch gets a channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import ConfigError
from ctseg.networks.blocks import conv_bn, conv_bn_relu

MIN_WIDTH = 8


def branch_widths(width: int) -> tuple[int, int, int, int]:
    """Output channels of the four branches: 1/4, 1/8, 1/2 and the remainder of `width`."""
    w1, w2, w3 = width // 4, width // 8, width // 2
    return w1, w2, w3, width - w1 - w2 - w3


class MFE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        width = max(channels, MIN_WIDTH)
        self.lift = conv_bn_relu(channels, width) if channels < MIN_WIDTH else nn.Identity()
        w1, w2, w3, w4 = branch_widths(width)
        self.branch1 = conv_bn_relu(width, w1)
        self.branch2 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(width, w2))
        self.branch3 = nn.Sequential(conv_bn_relu(width, w3), conv_bn_relu(w3, w3, 3))
        self.branch4 = nn.Sequential(conv_bn_relu(width, w4), conv_bn_relu(w4, w4, 3),
                                     conv_bn_relu(w4, w4, 3))
        self.smooth = conv_bn(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lift(x)
        y = torch.cat((self.branch1(y), self.branch2(y), self.branch3(y), self.branch4(y)), dim=1)
        return x + self.smooth(y)


class SplitMFE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        w1, w2, w3, w4 = branch_widths(channels)
        if min(w1, w2, w3, w4) < 1:
            raise ConfigError(f"SplitMFE({channels}): needs >= {MIN_WIDTH} channels so that each "
                              "of its four branches gets one")
        self.widths = [w1, w2, w3, w4]
        self.branch1 = nn.Conv2d(w1, w1, 1)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.branch2 = nn.Conv2d(w2, w2, 1)
        self.branch3 = nn.ModuleList([nn.Conv2d(w3, w3, 1), nn.Conv2d(w3, w3, 3, padding=1)])
        self.branch4 = nn.ModuleList([nn.Conv2d(w4, w4, 1), nn.Conv2d(w4, w4, 3, padding=1),
                                      nn.Conv2d(w4, w4, 3, padding=1)])
        self.smooth = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.widths, dim=1)
        y3, y4 = parts[2], parts[3]
        for conv in self.branch3:
            y3 = F.relu(conv(y3))
        for conv in self.branch4:
            y4 = F.relu(conv(y4))
        y = torch.cat((F.relu(self.branch1(parts[0])), F.relu(self.branch2(self.pool(parts[1]))),
                       y3, y4), dim=1)
        return x + self.smooth(y)
