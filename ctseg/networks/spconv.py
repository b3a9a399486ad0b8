"""SPConv: "Split to Be Slim" (Zhang et al., IJCAI 2020), a drop-in for a 3x3 conv.

Follows the official code (qiulinzhang/SPConv.pytorch, code/resnet_sp.py, `SPConv_3x3`):

* input channels split by `alpha`: the first int(C_in*alpha) are *representative*, the rest
  *redundant*;
* representative: group-wise 3x3 conv (groups=2, no bias) + point-wise 1x1 conv (no bias), summed,
  BatchNorm;
* redundant: 1x1 conv **with bias**, BatchNorm (the official code leaves the bias on; that bias is
  what makes the 64->64 count 13,632 = 9,216 + 2,048 + 2,112 + 2x128);
* stride 2: the group-wise conv strides, the 1x1 paths average-pool 2x2 first (the official code
  has a typo there, `x_1x1_se`, so its stride-2 path never ran; this one does). Pooling uses
  ceil_mode so odd sizes give the same H, W as the strided 3x3;
* fusion without parameters: global-average-pool each branch to (B, C_out) (two
  AdaptiveAvgPool2d modules, as in the official module), softmax over the two branches per
  channel, output = beta*rep + gamma*red.

Both branches already end in BatchNorm; where SPConv replaces a conv inside DoubleConv, the
block's own BN -> ReLU still follows (as the official ResNet keeps `bn2` after `SPConv_3x3`).

Constraints, checked at construction (ConfigError, not a cryptic cuDNN error on the first batch):
the representative channel count must be even and >= 2 and C_out even (groups=2). The
redundant part always keeps at least one channel, since int(C_in*alpha) < C_in for alpha < 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ctseg.errors import ConfigError


class SPConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 alpha: float = 0.5) -> None:
        super().__init__()
        where = f"SPConv({in_channels} -> {out_channels}, alpha={alpha})"
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"{where}: alpha must lie strictly between 0 and 1")
        if stride not in (1, 2):
            raise ConfigError(f"{where}: stride must be 1 or 2, got {stride}")
        rep = int(in_channels * alpha)
        if rep < 2 or rep % 2:
            raise ConfigError(
                f"{where}: the representative part int({in_channels}*{alpha}) = {rep} channels "
                "must be even and >= 2 (its 3x3 conv has groups=2); pick channel counts so that "
                "C_in*alpha is an even integer (multiples of 4 for alpha=0.5)")
        if out_channels < 2 or out_channels % 2:
            raise ConfigError(f"{where}: C_out = {out_channels} must be even (groups=2)")
        self.rep_channels = rep
        self.stride = stride
        self.gwc = nn.Conv2d(rep, out_channels, 3, stride=stride, padding=1, groups=2, bias=False)
        self.pwc = nn.Conv2d(rep, out_channels, 1, bias=False)
        self.conv1x1 = nn.Conv2d(in_channels - rep, out_channels, 1)
        self.bn_rep = nn.BatchNorm2d(out_channels)
        self.bn_red = nn.BatchNorm2d(out_channels)
        self.pool = (nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride == 2 else nn.Identity())
        self.gap_rep = nn.AdaptiveAvgPool2d(1)
        self.gap_red = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_rep, x_red = x[:, : self.rep_channels], x[:, self.rep_channels:]
        rep = self.bn_rep(self.gwc(x_rep) + self.pwc(self.pool(x_rep)))
        red = self.bn_red(self.conv1x1(self.pool(x_red)))
        scores = torch.stack((self.gap_rep(rep).flatten(1), self.gap_red(red).flatten(1)), dim=-1)
        weights = torch.softmax(scores, dim=-1)[..., None, None]  # (B, C_out, 2, 1, 1)
        return rep * weights[:, :, 0] + red * weights[:, :, 1]


def spconv_width(channels: int, alpha: float = 0.5) -> int:
    """The narrowest width >= `channels` that SPConv can split: int(width*alpha) even and >= 2
    (4 for alpha 0.5). The thesis ver3 lifts the CT slice to it with a bias-free 1x1 conv."""
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"SPConv: alpha must lie strictly between 0 and 1, got {alpha}")
    width = max(channels, 2)
    while int(width * alpha) < 2 or int(width * alpha) % 2:
        width += 1
    return width
