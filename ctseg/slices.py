"""What the network sees of a CT, in plain torch: HU window, in-plane resize, 2.5D context.

MONAI's package import loads every submodule (~6 s on a loaded 2-core machine, more than a
case's segmentation), so `ctseg predict` must not pay for it. This module computes exactly what
`ctseg.transforms.preprocess_transforms` (MONAI's `ScaleIntensityRanged` clip + `Resized`
bilinear with anti-aliasing) gives, with torch alone; tests/test_slices.py holds both to 1e-6.
Training's cache keeps MONAI's transforms; the predictor and the config helpers both sides
read live here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ctseg.config import config_view

__all__ = ["context_indices", "context_slices", "hu_window", "num_classes", "output_channels",
           "preprocess_slices", "resize_slices", "stack_context", "training_size"]


def training_size(config: dict) -> tuple[int, int]:
    """The in-plane (H, W) the network is trained and run at (`data.size`)."""
    return config_view(config).size


def hu_window(config: dict) -> tuple[float, float]:
    """`data.window` (low, high) in HU, mapped to [0, 1]."""
    lo, hi = config_view(config).data.window
    return float(lo), float(hi)


def num_classes(config: dict) -> int:
    """Classes including background (2 = binary: one output channel, sigmoid)."""
    return config_view(config).data.num_classes


def output_channels(config: dict) -> int:
    """Network outputs and soft-label channels: 1 for binary (foreground), else one per class."""
    k = num_classes(config)
    return 1 if k == 2 else k


def context_slices(config: dict) -> int:
    """`data.context`: the odd number of neighbouring slices stacked as channels (2.5D)."""
    return config_view(config).data.context


def context_indices(z: int, depth: int, k: int) -> np.ndarray:
    """Indices of the k slices centred on z, clamped to [0, depth) (edge slices repeat)."""
    return np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, depth - 1)


def stack_context(volume: torch.Tensor, k: int) -> torch.Tensor:
    """(z, H, W) -> (z, k, H, W): each slice with its k-1 neighbours as channels."""
    if k == 1:
        return volume[:, None]
    depth = volume.shape[0]
    index = torch.stack([torch.as_tensor(context_indices(z, depth, k)) for z in range(depth)])
    return volume[index.to(volume.device)]


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """MONAI's `gaussian_1d(sigma, truncated=4.0, approx="erf")`, not renormalised (sigma 0: [0, 1, 0])."""
    s = torch.as_tensor(sigma, dtype=torch.float)
    tail = int(max(float(s) * 4.0, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float)
    t = 0.70710678 / torch.abs(s)
    return (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)


def _anti_alias(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """MONAI's `GaussianSmooth` with sigma (factor - 1) / 2 per axis, as `Resize(anti_aliasing=True)`
    applies it before down-sampling: zero padding, rows then columns, one depthwise conv each."""
    factors = torch.div(torch.Tensor(list(image.shape[1:])), torch.Tensor(size))
    sigmas = torch.maximum(torch.zeros(factors.shape), (factors - 1) / 2).tolist()
    x, channels = image.unsqueeze(0), image.shape[0]
    kernels = [_gaussian_kernel(s) for s in sigmas]
    pads = [(len(k) - 1) // 2 for k in kernels]
    x = F.pad(x, [pads[1], pads[1], 0, 0])  # padded once, before both passes, as MONAI does
    x = F.pad(x, [0, 0, pads[0], pads[0]])
    for axis, kernel in enumerate(kernels):
        shape = [1, 1, 1, 1]
        shape[axis + 2] = -1
        x = F.conv2d(x, kernel.reshape(shape).repeat(channels, 1, 1, 1), groups=channels)
    return x.squeeze(0)


def resize_slices(volume: torch.Tensor, size: tuple[int, int], *, anti_aliasing: bool = False) -> torch.Tensor:
    """(n, y, x) float32 -> (n, *size): bilinear per slice, as MONAI's `Resize` (pixel centres,
    `align_corners=False`); `anti_aliasing` smooths first where a side shrinks."""
    size = tuple(int(s) for s in size)
    if tuple(volume.shape[1:]) == size:
        return volume
    if anti_aliasing and any(o < i for o, i in zip(size, volume.shape[1:])):
        volume = _anti_alias(volume, size)
    return F.interpolate(volume.unsqueeze(0), size=size, mode="bilinear").squeeze(0)


def preprocess_slices(hu_zyx: torch.Tensor, config: dict) -> torch.Tensor:
    """(z, y, x) float32 HU -> (z, H, W) in [0, 1] at the training size: `preprocess_transforms`'
    image path (window with clipping, then anti-aliased bilinear resize)."""
    lo, hi = hu_window(config)
    windowed = ((hu_zyx - lo) / (hi - lo)).clamp_(0.0, 1.0)
    return resize_slices(windowed, training_size(config), anti_aliasing=True)
