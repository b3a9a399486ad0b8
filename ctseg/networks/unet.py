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

The versions and variants only swap parts (the registry says which, per name and variant):
* `conv="spconv"` replaces the 3x3 convs inside DoubleConv by SPConv. Without `lift` (default)
  the very first conv stays a plain 3x3 that lifts the 1..k-channel CT slice (SPConv needs an
  even representative part >= 2, and the study found it failing on narrow inputs); with `lift`
  (thesis) a bias-free 1x1 conv first widens the slice to the narrowest width SPConv can split
  (4 at alpha 0.5) and every 3x3 conv, the first included, is SPConv;
* `encoder_block`, `bottleneck_block`, `decoder_block` pick each level's block: "double_conv",
  "conv_module" (CIE -> DoubleConv -> MFE) or "conv_module_thesis" (the study's ConvModule). The
  default ver5 uses ConvModule in the encoder and bottleneck, where MC-Net extracts features; the
  thesis ver5 uses the study's ConvModule in the encoder and decoder around a DoubleConv
  bottleneck;
* `attention` gates every skip with the decoder map one level deeper (before its up-sampling):
  "learned" (ResidualAttention), "parameter_free" (the thesis RA, arithmetic without weights) or
  "none".
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ctseg.errors import ConfigError, ModelError
from ctseg.networks.attention import ResidualAttention, parameter_free_attention
from ctseg.networks.blocks import ConvFactory, DoubleConv, conv3x3
from ctseg.networks.conv_module import ConvModule
from ctseg.networks.spconv import SPConv, spconv_width

DEFAULT_FEATURES = (64, 128, 256, 512)
CONVS = ("plain", "spconv")
BLOCKS = ("double_conv", "conv_module", "conv_module_thesis")
ATTENTIONS = ("none", "learned", "parameter_free")


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
                 alpha: float = 0.5, lift: bool = False, encoder_block: str = "double_conv",
                 bottleneck_block: str = "double_conv", decoder_block: str = "double_conv",
                 attention: str = "none", attention_ratio: float = 0.5) -> None:
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
        for what, block in (("encoder_block", encoder_block),
                            ("bottleneck_block", bottleneck_block),
                            ("decoder_block", decoder_block)):
            if block not in BLOCKS:
                raise ConfigError(f"UNet: {what} must be one of {BLOCKS}, got {block!r}")
        if attention not in ATTENTIONS:
            raise ConfigError(f"UNet: attention must be one of {ATTENTIONS}, got {attention!r}")
        self.depth = len(features)
        self.min_size = 2 ** self.depth
        self.parameter_free_attention = attention == "parameter_free"

        conv3: ConvFactory = partial(SPConv, alpha=alpha) if conv == "spconv" else conv3x3
        if lift:
            width = spconv_width(in_channels, alpha) if conv == "spconv" else in_channels
            self.lift: nn.Module = nn.Conv2d(in_channels, width, 1, bias=False)
        else:
            width, self.lift = in_channels, nn.Identity()

        def stage(block: str, c_in: int, c_out: int, first: bool = False) -> nn.Module:
            if block == "double_conv":
                return DoubleConv(c_in, c_out, conv=conv3,
                                  first_conv=conv3x3 if first and not lift else None)
            return ConvModule(c_in, c_out, thesis=block == "conv_module_thesis")

        self.encoder = nn.ModuleList()
        c_in = width
        for i, f in enumerate(features):
            self.encoder.append(stage(encoder_block, c_in, f, first=i == 0))
            c_in = f
        self.pool = nn.MaxPool2d(2, 2)
        self.bottleneck = stage(bottleneck_block, features[-1], features[-1] * 2)

        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.gates = nn.ModuleList()
        for f in reversed(features):
            self.ups.append(nn.ConvTranspose2d(f * 2, f, kernel_size=2, stride=2))
            self.gates.append(ResidualAttention(f, f * 2, ratio=attention_ratio)
                              if attention == "learned" else ConcatSkip())
            self.decoder.append(stage(decoder_block, f * 2, f))
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.min_size or x.shape[-1] < self.min_size:
            raise ModelError(f"UNet of depth {self.depth} needs H, W >= {self.min_size}, "
                             f"got H={x.shape[-2]}, W={x.shape[-1]}")
        x = self.lift(x)
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, gate, block in zip(self.ups, self.gates, self.decoder):
            skip = gate(skips.pop(), x)  # deepest first
            if self.parameter_free_attention:
                skip = parameter_free_attention(skip, x)
            x = block(torch.cat((skip, _pad_to(up(x), skip)), dim=1))
        return self.head(x)
