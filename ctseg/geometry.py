"""The network's in-plane field of view: which original pixels a slice's (H, W) input covers.

Resizing every slice from its pixel count to `data.size` shows the lungs at another scale on a
scan with another pixel spacing or field of view than training saw (issue 12: a 3 mm-pixel case
failed). With `data.spacing` set, the input covers a fixed physical field, H*sy x W*sx mm, as in
nnU-Net and TotalSegmentator: each volume is cropped or padded (air) to the box of original pixels
of that physical size, centred on the body, before the usual window and resize; the maps the
network returns are resized to the box and put back into the original grid (`uncrop`).

numpy only (no MONAI, no torch): the training cache, `predict_volume` and the MONAI bundle's
vendored transforms all use this one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["AIR_HU", "BODY_HU", "Box", "background_fill", "body_centre", "crop_or_pad", "fov_box", "uncrop"]

AIR_HU = -1024.0  # padding of HU images: air, 0 after any lung window
BODY_HU = -500.0  # voxels above this are body (or table), below it air and lung


@dataclass(frozen=True)
class Box:
    """A (rows, cols) box of original pixels starting at (y0, x0); it may extend past the image."""

    y0: int
    x0: int
    rows: int
    cols: int


def body_centre(hu_zyx: np.ndarray) -> tuple[float, float]:
    """(y, x) centre of the in-plane bounding box of voxels above BODY_HU over the whole volume;
    the image centre when there are none."""
    rows, cols = hu_zyx.shape[-2:]
    inside = (np.asarray(hu_zyx) > BODY_HU).reshape(-1, rows, cols).any(axis=0)
    ys, xs = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if ys.size == 0:
        return (rows - 1) / 2, (cols - 1) / 2
    return float(ys[0] + ys[-1]) / 2, float(xs[0] + xs[-1]) / 2


def fov_box(hu_zyx: np.ndarray, spacing_yx: Sequence[float], target_spacing_yx: Sequence[float],
            size_hw: Sequence[int]) -> Box:
    """The box of original pixels that `size_hw` network pixels at `target_spacing_yx` mm cover,
    centred on the body (`body_centre`)."""
    if len(spacing_yx) != 2 or not all(np.isfinite(s) and s > 0 for s in spacing_yx):
        raise ValueError(f"in-plane spacing must be two positive numbers (mm), got {tuple(spacing_yx)}")
    rows, cols = (max(1, int(round(n * t / s))) for n, t, s in zip(size_hw, target_spacing_yx, spacing_yx))
    cy, cx = body_centre(hu_zyx)
    return Box(int(np.floor(cy - (rows - 1) / 2 + 0.5)), int(np.floor(cx - (cols - 1) / 2 + 0.5)), rows, cols)


def _overlap(box: Box, shape_yx: Sequence[int]) -> tuple[slice, slice, slice, slice]:
    """(image rows, image cols, box rows, box cols) slices of the part of `box` inside the image."""
    y0, x0 = max(box.y0, 0), max(box.x0, 0)
    y1, x1 = max(min(box.y0 + box.rows, shape_yx[0]), y0), max(min(box.x0 + box.cols, shape_yx[1]), x0)
    return (slice(y0, y1), slice(x0, x1), slice(y0 - box.y0, y1 - box.y0), slice(x0 - box.x0, x1 - box.x0))


def crop_or_pad(volume_zyx: np.ndarray, box: Box, fill: float) -> np.ndarray:
    """(..., y, x) -> (..., box.rows, box.cols): the box's pixels, `fill` where it leaves the image."""
    out = np.full((*volume_zyx.shape[:-2], box.rows, box.cols), fill, dtype=volume_zyx.dtype)
    iy, ix, by, bx = _overlap(box, volume_zyx.shape[-2:])
    out[..., by, bx] = volume_zyx[..., iy, ix]
    return out


def uncrop(volume_czyx: np.ndarray, box: Box, shape_yx: Sequence[int],
           fill: float | Sequence[float]) -> np.ndarray:
    """The inverse of `crop_or_pad`: a (..., box.rows, box.cols) map placed into the original
    (..., y, x) grid, `fill` outside the box (one value, or one per index of the first axis, e.g.
    background probability 1 and foreground 0)."""
    if volume_czyx.shape[-2:] != (box.rows, box.cols):
        raise ValueError(f"expected (..., {box.rows}, {box.cols}) maps, got {tuple(volume_czyx.shape)}")
    out = np.empty((*volume_czyx.shape[:-2], *(int(n) for n in shape_yx)), dtype=volume_czyx.dtype)
    values = np.asarray(fill, dtype=volume_czyx.dtype)
    out[...] = values.reshape(values.shape + (1,) * (out.ndim - values.ndim)) if values.ndim else values
    iy, ix, by, bx = _overlap(box, shape_yx)
    out[..., iy, ix] = volume_czyx[..., by, bx]
    return out


def background_fill(channels: int) -> tuple[float, ...]:
    """`uncrop`'s fill for class probabilities: outside the field of view is background, i.e.
    foreground 0 (one sigmoid channel), or background 1 and every other class 0 (softmax)."""
    return (0.0,) if channels == 1 else (1.0,) + (0.0,) * (channels - 1)
