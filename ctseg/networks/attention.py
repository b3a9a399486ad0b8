"""RA skip: the residual-attention gate MC-Net (Xia et al., Applied Intelligence 2021) puts on
each U-Net skip connection.

Inputs: the encoder skip x (C_x, H x W) and the deeper decoder map g (C_g, about H/2 x W/2)
before it is up-sampled. Both are projected by 1x1 convs to C_int channels, the projected g is
bilinearly up-sampled to x's size, the sum goes through ReLU, a 1x1 conv to one channel and a
sigmoid: alpha in (0, 1) per pixel. The new skip is x*alpha + x, so attention can only emphasise
features, never erase the skip (residual attention, Wang et al. CVPR 2017).

Choices the paper leaves open, taken here:
* C_int = max(1, round(C_x * ratio)), ratio 0.5 by default (the issue's C_x/2);
* each 1x1 conv (both projections and the one-channel map) is conv -> BatchNorm without bias, as
  in the Attention U-Net gate (Oktay et al., 2018) this gate descends from;
* g is projected *before* up-sampling: 1x1 conv, eval-mode BN and bilinear interpolation are all
  per-pixel affine maps with weights summing to one, so the order does not change the result but
  the projection runs on a quarter of the pixels;
* up-sampling targets x's exact size rather than a fixed x2, so odd H or W work.

`parameter_free_attention` is the thesis variant's gate: the study says its RA "does not need
the addition of training parameters" (its ver4 has ver1's parameter and layer counts), yet the
gate's channel-matching projections are learned convs. Without weights, the channels are matched
by their mean (a fixed 1x1 projection to one channel): alpha = sigmoid(mean_c(x) +
up(mean_c(g))); without the learned one-channel conv after it, a ReLU before the sigmoid would pin
alpha to [0.5, 1), so there is none. It is plain arithmetic in the U-Net's forward, not a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import ConfigError
from ctseg.networks.blocks import conv_bn


class ResidualAttention(nn.Module):
    def __init__(self, skip_channels: int, gate_channels: int, ratio: float = 0.5) -> None:
        super().__init__()
        if not ratio > 0:
            raise ConfigError(f"ResidualAttention: ratio must be > 0, got {ratio}")
        inter = max(1, round(skip_channels * ratio))
        self.project_x = conv_bn(skip_channels, inter)
        self.project_g = conv_bn(gate_channels, inter)
        self.psi = conv_bn(inter, 1)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = F.interpolate(self.project_g(g), size=x.shape[-2:], mode="bilinear",
                          align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(self.project_x(x) + g)))
        return x * alpha + x


def parameter_free_attention(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The thesis RA: x*alpha + x with alpha from the channel means of x and g (no weights)."""
    g = F.interpolate(g.mean(dim=1, keepdim=True), size=x.shape[-2:], mode="bilinear",
                      align_corners=False)
    return x * torch.sigmoid(x.mean(dim=1, keepdim=True) + g) + x
