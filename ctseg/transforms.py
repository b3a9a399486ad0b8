"""The MONAI dictionary transforms between a HU volume and the network.

Every transform here is MONAI's own; this module only builds them from the config for training.
`ctseg predict` (and validation, through `predict_volume`) computes the same preprocessing with
torch alone (`ctseg.slices`, tested equal), so it never imports MONAI. The transforms:

1. `preprocess_transforms` (whole (z, y, x) volume, deterministic): HU window -> [0, 1]
   (`ScaleIntensityRanged`, clipped), then in-plane resize to the training size (`Resized`). The
   z axis is MONAI's channel axis here, so each slice is resized on its own and slices never mix.
   Windowing first means the resize's zero padding is air, not water, and bone above the window
   cannot bleed into soft tissue. Training applies it once when a case is cached.
2. `augment_transforms` (one (C, H, W) slice, random): each augmentation with its probability;
   `RandFieldOfViewd` (ours, the one non-MONAI transform) simulates another scanner's
   reconstruction field.

Config sections read:
    data:    {window: [-1000, 400], size: [H, W]}
    augment: {rotate: {prob, degrees}, flip: {prob, axes}, scale: {prob, range, translate},
              elastic: {prob, spacing, magnitude}, noise: {prob, std | std_hu},
              contrast: {prob, gamma},
              field_of_view: {prob, shapes, radius | radius_mm, offset, fill_hu}}
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandomizableTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandZoomd,
    Resized,
    ScaleIntensityRanged,
)

from ctseg.config import config_view
from ctseg.errors import ConfigError
from ctseg.geometry import background_fill
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


class RandFieldOfViewd(RandomizableTransform, MapTransform):
    """Another scanner's reconstruction field on a windowed 2D sample {"image", "label"}.

    Real scans come with other fields of view than the body-centred box training crops: a
    reconstruction circle whose outside holds a padding value (-1024, -2000, -3024 HU) or air, a
    smaller display field that cuts off the arms or a lung's edge, a body off-centre in it. With
    probability `prob`, everything outside a random circle or square (half-size `radius` times
    the input's half-width, centre shifted by up to `offset` of it per axis) becomes the windowed
    value of a random `fill_hu`, and the label there background: a lung the field cut off is not
    visible, so it is not labelled. It runs on the sample at network size after the spatial
    augmentations, as the scanner's field is fixed in the image, not in the patient, and after the
    intensity ones, as a scanner's padding is an exact constant. `spacing_yx` (mm per input pixel,
    `data.spacing`) makes the circle round in mm on anisotropic inputs.
    """

    def __init__(self, prob: float, shapes: Sequence[str], radius: Sequence[float], offset: float,
                 fill_hu: Sequence[float], window: tuple[float, float],
                 spacing_yx: Sequence[float] = (1.0, 1.0)) -> None:
        MapTransform.__init__(self, ["image", "label"])
        RandomizableTransform.__init__(self, prob)
        self.shapes = tuple(shapes)
        self.radius = (float(radius[0]), float(radius[1]))
        self.offset = float(offset)
        lo, hi = window
        self.fills = tuple(float(np.clip((v - lo) / (hi - lo), 0.0, 1.0)) for v in fill_hu)
        self.spacing_yx = (float(spacing_yx[0]), float(spacing_yx[1]))
        self._shape, self._r, self._dy, self._dx, self._fill = "circle", 1.0, 0.0, 0.0, 0.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self._shape = self.shapes[self.R.randint(len(self.shapes))]
        self._r = self.R.uniform(*self.radius)
        self._dy, self._dx = self.R.uniform(-self.offset, self.offset, size=2)
        self._fill = self.fills[self.R.randint(len(self.fills))]

    def outside(self, rows: int, cols: int) -> np.ndarray:
        """(rows, cols) bool: the pixels outside the drawn field."""
        sy, sx = self.spacing_yx
        half_mm = min(rows * sy, cols * sx) / 2  # the input's half-width, mm (pixels without spacing)
        y = (np.arange(rows) - ((rows - 1) / 2 + self._dy * half_mm / sy)) * sy / (self._r * half_mm)
        x = (np.arange(cols) - ((cols - 1) / 2 + self._dx * half_mm / sx)) * sx / (self._r * half_mm)
        if self._shape == "circle":
            return y[:, None] ** 2 + x[None, :] ** 2 > 1.0
        return (np.abs(y)[:, None] > 1.0) | (np.abs(x)[None, :] > 1.0)

    def __call__(self, data: dict) -> dict:
        self.randomize()
        if not self._do_transform:
            return data
        d = dict(data)
        outside = self.outside(*d["image"].shape[-2:])
        d["image"] = _fill_outside(d["image"], outside, (self._fill,))
        d["label"] = _fill_outside(d["label"], outside, background_fill(d["label"].shape[0]))
        return d


def _fill_outside(x: np.ndarray | torch.Tensor, outside: np.ndarray,
                  values: Sequence[float]) -> np.ndarray | torch.Tensor:
    """A copy of (C, H, W) `x` holding `values` (one, or one per channel) where `outside` is true."""
    fill = np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)
    if isinstance(x, torch.Tensor):
        mask = torch.from_numpy(outside).to(x.device)
        return torch.where(mask, torch.from_numpy(fill).to(x.device, x.dtype), x)
    return np.where(outside, fill.astype(x.dtype), x)


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
        r, shift = float(aug.scale.range), float(aug.scale.translate)
        if shift:  # the body off the box's centre (e.g. a table or arms moved the body's bounding box)
            h, w = training_size(config)
            out.append(RandAffined(keys=both, prob=prob("scale"), scale_range=(r, r),
                                   translate_range=(shift * h, shift * w), mode=modes,
                                   padding_mode=["zeros", "border"]))
        else:
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
    if prob("field_of_view"):  # last: see RandFieldOfViewd
        fov, spacing = aug.field_of_view, config_view(config).spacing
        radius = fov.radius
        if fov.radius_mm is not None:
            if spacing is None:
                raise ConfigError("augment.field_of_view.radius_mm needs data.spacing (mm per input pixel); "
                                  "without it give augment.field_of_view.radius, a fraction of the input")
            h, w = training_size(config)
            radius = [r / (min(h * spacing[0], w * spacing[1]) / 2) for r in fov.radius_mm]
        out.append(RandFieldOfViewd(prob("field_of_view"), fov.shapes, radius, fov.offset, fov.fill_hu,
                                    hu_window(config), spacing or (1.0, 1.0)))
    return out


def preprocess_transforms(config: dict, keys: tuple[str, ...] = ("image", "label")) -> Compose:
    """Whole-volume preprocessing of the training cache (`ctseg.slices.preprocess_slices` for the predictor)."""
    return Compose([window_transform(config), resize_transform(config, keys)])


def train_transforms(config: dict) -> Compose:
    """Per-sample pipeline for training slices (already windowed and at training size)."""
    return Compose([*augment_transforms(config), EnsureTyped(keys=["image", "label"], track_meta=False)])
