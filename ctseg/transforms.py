"""The MONAI dictionary transforms between a HU volume and the network.

Every transform here is MONAI's own; this module only builds them from the config for training.
`ctseg predict` (and validation, through `predict_volume`) computes the same preprocessing with
torch alone (`ctseg.slices`, tested equal), so it never imports MONAI. The transforms:

1. `preprocess_transforms` (whole (z, y, x) volume, deterministic): HU window -> [0, 1]
   (`ScaleIntensityRanged`, clipped), then in-plane resize to the training size (`Resized`). The
   z axis is MONAI's channel axis here, so each slice is resized on its own and slices never mix.
   Windowing first means the resize's zero padding is air, not water, and bone above the window
   cannot bleed into soft tissue. Training applies it once when a case is cached.
2. `augment_transforms` (one (C, H, W) slice, random): each augmentation with its probability.

Config sections read:
    data:    {window: [-1000, 400], size: [H, W]}
    augment: {rotate: {prob, degrees}, flip: {prob, axes}, scale: {prob, range},
              elastic: {prob, spacing, magnitude}, noise: {prob, std | std_hu},
              contrast: {prob, gamma}}
"""

from __future__ import annotations

import math

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
    Resized,
    ScaleIntensityRanged,
)

from ctseg.config import config_view
from ctseg.slices import hu_window, num_classes, output_channels, training_size


def label_channels(label_zyx: np.ndarray, config: dict) -> np.ndarray:
    """(z, y, x) integer labels -> (z * C, y, x) float32 0/1 channels, slice-major.

    The layout keeps each slice's class channels together so `resize_transform` (z as MONAI's
    channel axis) resizes them as 2D maps; reshape the result to (z, C, H, W).
    """
    k = num_classes(config)
    classes = [1] if k == 2 else list(range(k))
    channels = np.stack([label_zyx == c for c in classes], axis=1).astype(np.float32)
    return channels.reshape(-1, *label_zyx.shape[1:])


def resize_transform(config: dict, keys: tuple[str, ...] = ("image", "label")) -> Resized:
    """Resize each slice of a (z, y, x) volume to the training size (z is MONAI's channel axis).

    Bilinear for images and labels alike: both keep the same pixel-centre geometry, which the
    predictor inverts with a bilinear up-sampling of the probabilities. Labels arrive as one
    channel per class (0/1) and leave as soft targets (the fraction of each class), because any
    nearest-neighbour pick at an even factor shifts the mask by half an input pixel: 512 -> 256
    nearest labels alone cap the volume Dice of LCTSC lungs at ~0.984-0.99. Images are also
    anti-aliased (a Gaussian before down-sampling), so fine lung texture does not alias.
    """
    return Resized(keys=list(keys), spatial_size=training_size(config), mode="bilinear",
                   anti_aliasing=tuple(k == "image" for k in keys))


def window_transform(config: dict, keys: tuple[str, ...] = ("image",)) -> ScaleIntensityRanged:
    lo, hi = hu_window(config)
    return ScaleIntensityRanged(keys=list(keys), a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)


def augment_transforms(config: dict) -> list[MapTransform]:
    """Random augmentations of a windowed 2D sample {"image": (k,H,W), "label": (C,H,W)}.

    Spatial ones first, applied to image and soft label alike (bilinear; outside the image the
    image is padded with air, the label with its own border, i.e. background), then
    intensity ones (image only). A transform is left out when its probability is 0 or absent.
    """
    aug = config_view(config).augment  # absent transforms are None; values checked by the schema
    out: list[MapTransform] = []
    both, modes = ["image", "label"], ["bilinear", "bilinear"]

    def prob(name: str) -> float:
        spec = getattr(aug, name)
        return float(spec.prob) if spec is not None else 0.0

    if prob("rotate"):
        rad = math.radians(float(aug.rotate.degrees))
        out.append(RandRotated(keys=both, range_x=rad, prob=prob("rotate"), mode=modes,
                               padding_mode=["zeros", "border"], keep_size=True))
    if prob("scale"):
        r = float(aug.scale.range)
        out.append(RandZoomd(keys=both, min_zoom=1.0 - r, max_zoom=1.0 + r, prob=prob("scale"),
                             mode=modes, padding_mode=["constant", "edge"], keep_size=True))
    if prob("elastic"):
        spacing = float(aug.elastic.spacing)
        magnitude = tuple(float(m) for m in aug.elastic.magnitude)
        out.append(Rand2DElasticd(keys=both, spacing=(spacing, spacing), magnitude_range=magnitude,
                                  prob=prob("elastic"), mode=modes, padding_mode=["zeros", "border"]))
    if prob("flip"):
        # Flip axes are spatial axes of the (H, W) slice: 1 = left-right, 0 = anterior-posterior.
        for axis in aug.flip.axes:
            out.append(RandFlipd(keys=both, prob=prob("flip"), spatial_axis=int(axis)))
    if prob("contrast"):
        gamma = tuple(float(g) for g in aug.contrast.gamma)
        out.append(RandAdjustContrastd(keys=["image"], prob=prob("contrast"), gamma=gamma))
    if prob("noise"):
        # `std_hu` is the noise in Hounsfield units; `std` is in windowed [0, 1] units.
        noise = aug.noise
        lo, hi = hu_window(config)
        std = float(noise.std_hu) / (hi - lo) if noise.std_hu is not None else float(noise.std)
        out.append(RandGaussianNoised(keys=["image"], prob=prob("noise"), std=std))
    return out


def preprocess_transforms(config: dict, keys: tuple[str, ...] = ("image", "label")) -> Compose:
    """Whole-volume preprocessing of the training cache (`ctseg.slices.preprocess_slices` for the predictor)."""
    return Compose([window_transform(config), resize_transform(config, keys)])


def train_transforms(config: dict) -> Compose:
    """Per-sample pipeline for training slices (already windowed and at training size)."""
    return Compose([*augment_transforms(config), EnsureTyped(keys=["image", "label"], track_meta=False)])
