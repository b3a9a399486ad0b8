"""ConvModule: the MC-Net stage block of the study's ver5, CIE -> DoubleConv -> MFE.

Order, and why: CIE and MFE are residual and keep their width, so the DoubleConv is the only part
that changes C_in to C_out. CIE comes first because its three full-width dilated 3x3 convs are
the expensive part (30*C^2 weights): on the stage's input, which in the encoder is half the
stage's width, it costs a quarter of the weights and FLOPs it would after the DoubleConv, and at
the first stage it works on the raw slice, widening the receptive field (up to 21x21) before any
channel mixing. MFE comes last, at the output width, so the multi-scale features it adds are
exactly what the stage hands to its skip connection and to the next stage.

`thesis=True` builds the study's ConvModule: the same order with ThesisCIE and SplitMFE
(convs with bias, no BatchNorm, MFE splitting its input channels); the DoubleConv is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ctseg.networks.blocks import DoubleConv
from ctseg.networks.cie import CIE, ThesisCIE
from ctseg.networks.mfe import MFE, SplitMFE


class ConvModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, thesis: bool = False) -> None:
        super().__init__()
        self.cie = ThesisCIE(in_channels) if thesis else CIE(in_channels)
        self.double_conv = DoubleConv(in_channels, out_channels)
        self.mfe = SplitMFE(out_channels) if thesis else MFE(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mfe(self.double_conv(self.cie(x)))
