"""The bundle's own MONAI components: `ctseg export-bundle` ships this module as `scripts/transforms.py`.

A MONAI bundle must run where only MONAI and a few indexed packages are installed, so this module
imports nothing of ctseg but `ctseg.errors`, `ctseg.io`, `ctseg.geometry`, `ctseg.body` and `ctseg.data.cases`, which the export
vendors beside it (imports rewritten to `scripts.`); everything else is torch, numpy and MONAI.
The bundle configs name these by `_target_` around MONAI's own transforms:

- `case_datalist(dataset_dir)`: the cases of a folder (DICOM series folder, seed layout, one folder
  per case, NIfTI files) as MONAI data dicts, with labels for training;
- `LoadCTSeriesd`: a case's CT (and mask) through the vendored `io` as (1, x, y, z) MetaTensors with
  the RAS affine, what `LoadImaged` + `EnsureChannelFirstd` give for the NIfTI `ctseg convert` writes;
- `BodyMaskd`: the patient's body (`ctseg.body`) from the loaded HU, kept for post-processing;
- `FieldOfViewd`: with the run's `data.spacing`, each (z, y, x) volume cropped or padded to the
  body-centred box of pixels the network input covers (`ctseg.geometry`), the box kept in the
  image's metadata;
- `StackContextd`: 2.5D context, each axial slice with its neighbours as channels;
- `RestoreSlicesd`: per-slice class probabilities resized back to the CT's grid (through the field
  of view's box when there is one), in MONAI's layout;
- `RestrictToBodyd`: labels outside the body dropped, before components are kept;
- `InForegroundBoxd`: runs MONAI label transforms in the foreground's bounding box (same result,
  a fraction of the time);
- `SaveCTMaskd`: `<output_dir>/<case>.nii.gz` through the vendored NIfTI writer.

Each copies what `ctseg predict` does; tests/test_bundle.py keeps the outputs equal.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection
from monai.data import MetaTensor

from ctseg.body import body_mask
from ctseg.data.cases import Case, discover_cases
from ctseg.errors import CTSegError, DicomError
from ctseg.geometry import AIR_HU, Box, background_fill, crop_or_pad, fov_box, uncrop
from ctseg.io import load_image, load_mask, save_nifti
from ctseg.io.nifti import nifti_stem

log = logging.getLogger(__name__)


def case_datalist(dataset_dir: str | Path, labelled: bool = False) -> list[dict[str, str]]:
    """The cases of `dataset_dir` (or the one NIfTI file it names) as `{"image", "case"[, "label"]}`.

    With `labelled`, only cases with a mask, and at least one is required (training, evaluation).
    """
    path = Path(dataset_dir).resolve()
    if path.is_file():
        stem = nifti_stem(path)
        if stem is None:
            raise DicomError(f"{path}: a file input must be NIfTI (.nii or .nii.gz); give a DICOM "
                             "series as its folder")
        cases = [Case(stem, path)]
    elif path.exists():
        cases = discover_cases(path)
    else:
        raise DicomError(f"{path}: no such file or folder")
    if not labelled:
        return [{"image": str(c.image), "case": c.name} for c in cases]
    data = [{"image": str(c.image), "label": str(c.label), "case": c.name} for c in cases if c.label]
    if not data:
        raise DicomError(f"{path}: no case has a mask (Segmentations/<case>_seg.npz, "
                         "<case>/mask.nii.gz or <case>_seg.nii.gz)")
    return data


def _channel_first(array_zyx: np.ndarray, affine: np.ndarray, source: Path) -> MetaTensor:
    """(z, y, x) -> MetaTensor (1, x, y, z) with the RAS affine; only geometry in the metadata."""
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    meta = {"original_affine": affine_t.clone(), "space": "RAS",
            "spatial_shape": np.asarray(array_zyx.shape[::-1]), "filename_or_obj": str(source),
            "original_channel_dim": "no_channel"}
    array = torch.from_numpy(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)))[None]
    return MetaTensor(array, affine=affine_t, meta=meta)


class LoadCTSeriesd(mt.MapTransform):
    """Load a case's CT (any input `ctseg.io.load_image` reads) and optionally its mask as (1, x, y, z).

    The CT is float32 HU, the mask uint8 on the CT's grid (seed `.npz` or NIfTI), both with the
    CT's RAS affine. No DICOM header field that could identify a patient enters the metadata.
    """

    def __init__(self, keys: KeysCollection = "image", label_key: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = Path(d[key])
            volume = load_image(source)  # as `ctseg predict` reads it
            d[key] = _channel_first(volume.array, volume.affine, source)
            if self.label_key is not None:
                mask_path = Path(d[self.label_key])
                d[self.label_key] = _channel_first(load_mask(mask_path, volume), volume.affine, mask_path)
        return d


class FieldOfViewd(mt.MapTransform):
    """(z, y, x) volumes cropped or padded to the box `size` pixels of `spacing` mm cover, centred
    on the body of `image_key` (`ctseg.geometry.fov_box`), as `ctseg predict` does; identity when
    `spacing` is None. The image pads with air, other keys (labels) with 0. The in-plane spacing
    comes from the loaded CT's `original_affine`; the box goes into the image's metadata
    (`fov_box`: y0, x0, rows, cols) for `RestoreSlicesd`.
    """

    def __init__(self, keys: KeysCollection, spacing: float | Sequence[float] | None,
                 size: Sequence[int], image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spacing = None if spacing is None else (
            (float(spacing),) * 2 if np.isscalar(spacing) else tuple(float(s) for s in spacing))
        self.size = tuple(int(s) for s in size)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.spacing is None:
            return d
        image = d[self.image_key]
        if image.ndim != 3:
            raise CTSegError(f"FieldOfViewd: expected a (z, y, x) volume, got {tuple(image.shape)}")
        affine = np.asarray(image.meta["original_affine"], dtype=np.float64)
        spacing_yx = (float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0])))
        box = fov_box(image.numpy(), spacing_yx, self.spacing, self.size)
        for key in self.key_iterator(d):
            volume = d[key]
            fill = AIR_HU if key == self.image_key else 0
            cropped = torch.from_numpy(crop_or_pad(volume.numpy(), box, fill))
            meta = dict(volume.meta)
            if key == self.image_key:
                meta["fov_box"] = np.asarray([box.y0, box.x0, box.rows, box.cols])
            d[key] = MetaTensor(cropped, affine=volume.affine, meta=meta)
        return d


class BodyMaskd(mt.MapTransform):
    """`body_key` = the body mask (1, x, y, z) bool of the (1, x, y, z) HU image in `keys`.

    Runs right after loading, while the image is still HU on the CT's grid; `RestrictToBodyd`
    uses it after the network, as `ctseg predict` does with `infer.body_mask`.
    """

    def __init__(self, keys: KeysCollection = "image", body_key: str = "body",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.body_key = body_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            hu_zyx = torch.as_tensor(d[key])[0].numpy().transpose(2, 1, 0)
            body_xyz = np.ascontiguousarray(body_mask(hu_zyx).transpose(2, 1, 0))
            d[self.body_key] = torch.from_numpy(body_xyz)[None]
        return d


class RestrictToBodyd(mt.MapTransform):
    """Zero the (1, x, y, z) label map in `keys` outside `body_key`'s mask (`BodyMaskd`)."""

    def __init__(self, keys: KeysCollection = "pred", body_key: str = "body",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.body_key = body_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        body = torch.as_tensor(d[self.body_key]).bool()
        for key in self.key_iterator(d):
            labels = d[key]
            if tuple(body.shape[-3:]) != tuple(labels.shape[-3:]):
                raise CTSegError(f"RestrictToBodyd: body {tuple(body.shape)} and {key!r} "
                                 f"{tuple(labels.shape)} differ in shape")
            out = labels.clone()
            out[~body.reshape(labels.shape).to(labels.device)] = 0
            d[key] = out
        return d


def context_indices(z: int, depth: int, k: int) -> np.ndarray:
    """Indices of the k slices centred on z, clamped to [0, depth) (edge slices repeat)."""
    return np.clip(np.arange(z - k // 2, z + k // 2 + 1), 0, depth - 1)


class StackContextd(mt.MapTransform):
    """(z, H, W) -> (k, z, H, W): channel c of slice z is slice z + c - k // 2 (clamped).

    `SliceInferer(spatial_dim=0)` then feeds the network (k, H, W) slices, as training did.
    """

    def __init__(self, keys: KeysCollection, context: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if context < 1 or context % 2 == 0:
            raise CTSegError(f"StackContextd: context must be a positive odd number, got {context}")
        self.context = context

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            volume = d[key]
            if volume.ndim != 3:
                raise CTSegError(f"StackContextd: expected a (z, H, W) volume, got {tuple(volume.shape)}")
            depth = volume.shape[0]
            index = torch.stack([torch.as_tensor(context_indices(z, depth, self.context))
                                 for z in range(depth)]).T
            d[key] = volume[index.to(volume.device)]
        return d


class RestoreSlicesd(mt.MapTransform):
    """Per-slice maps (C, z, H, W) -> (C, x, y, z) on the CT's grid, as `ctseg predict` resizes them.

    Bilinear resizing of each (H, W) map to the CT's (y, x), applied to probabilities (before
    thresholding), so boundaries fall at the CT's resolution. The grid and affine come from the
    loaded CT (`image_key`'s `spatial_shape` and `original_affine`). After `FieldOfViewd` (a
    `fov_box` in the metadata) the maps are resized to the box and placed into the grid, background
    outside it.
    """

    def __init__(self, keys: KeysCollection = "pred", image_key: str = "image",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = d[self.image_key].meta
        cols, rows, depth = (int(s) for s in meta["spatial_shape"])
        affine = torch.as_tensor(meta["original_affine"], dtype=torch.float64)
        box = Box(*(int(v) for v in meta["fov_box"])) if "fov_box" in meta else None
        out_rows, out_cols = (box.rows, box.cols) if box is not None else (rows, cols)
        for key in self.key_iterator(d):
            probs = torch.as_tensor(d[key]).float()
            channels = probs.shape[0]
            if probs.ndim != 4 or probs.shape[1] != depth:
                raise CTSegError(f"RestoreSlicesd: expected ({channels}, {depth}, H, W), got {tuple(probs.shape)}")
            probs = probs.reshape(channels * depth, *probs.shape[2:])
            probs = mt.Resize(spatial_size=(out_rows, out_cols), mode="bilinear")(probs)
            probs = torch.as_tensor(probs).reshape(channels, depth, out_rows, out_cols)
            if box is not None:  # outside the field of view: background, as `ctseg predict`
                probs = torch.from_numpy(uncrop(probs.numpy(), box, (rows, cols), background_fill(channels)))
            restored = probs.permute(0, 3, 2, 1).contiguous()
            d[key] = MetaTensor(restored, affine=affine, meta={"original_affine": affine.clone(),
                                                               "space": "RAS"})
        return d


class InForegroundBoxd(mt.MapTransform):
    """Apply label transforms to the foreground's bounding box (+1 voxel) of (1, ...) label maps.

    For transforms whose result depends only on the labelled voxels and their connectivity to the
    volume border (connected components, hole filling) this equals applying them to the whole map
    (the margin, outside all labels, connects the box's border to the volume's), at the cost of the
    box: MONAI's `FillHoles` took 8 s on a whole 154x512x512 thoracic CT.
    """

    def __init__(self, keys: KeysCollection, transforms: Sequence[Callable],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transforms = mt.Compose(list(transforms))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.in_box(d[key])
        return d

    def in_box(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim < 2 or labels.shape[0] != 1:
            raise ValueError(f"InForegroundBoxd expects a (1, ...) label map, got {tuple(labels.shape)}")
        found = torch.nonzero(labels[0])
        if found.numel() == 0:
            return labels
        lo = (found.min(dim=0).values - 1).clamp(min=0)
        hi = found.max(dim=0).values + 2
        box = (slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))
        out = labels.clone()
        out[box] = torch.as_tensor(self.transforms(labels[box].clone()), dtype=labels.dtype)
        return out


class SaveCTMaskd(mt.MapTransform):
    """Write a (1, x, y, z) label map as `<output_dir>/<case>.nii.gz` (uint8, the CT's affine)."""

    def __init__(self, keys: KeysCollection, output_dir: str | Path, name_key: str = "case",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            if not isinstance(labels, MetaTensor):
                raise CTSegError(f"SaveCTMaskd: {key!r} carries no affine (not a MetaTensor)")
            array = labels.detach().cpu().numpy()
            if array.ndim != 4 or array.shape[0] != 1:
                raise CTSegError(f"SaveCTMaskd: expected a (1, x, y, z) label map, got {array.shape}")
            path = self.output_path(str(d[self.name_key]))
            save_nifti(np.rint(array[0]).astype(np.uint8).transpose(2, 1, 0),
                       labels.affine.cpu().numpy(), path, kind="label")
            log.info("wrote %s", path)
        return d

    def output_path(self, case: str) -> Path:
        """`output_dir/<case>.nii.gz`, refused when the case name would leave `output_dir`."""
        if case in ("", ".", "..") or any(c in case for c in ("/", "\\", "\x00")):
            raise CTSegError(f"case name {case!r} cannot be used as a file name")
        root = self.output_dir.resolve()
        path = (root / f"{case}.nii.gz").resolve()
        if path.parent != root:
            raise CTSegError(f"case name {case!r} would write outside {root}")
        return path
