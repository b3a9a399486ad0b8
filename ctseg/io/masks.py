"""Label maps for a loaded volume, checked to fit it before anyone trains or scores on them."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from ctseg.errors import MaskError
from ctseg.io.volume import CTVolume

#: Largest affine difference (mm, and per direction-cosine unit) between a NIfTI mask and its
#: volume; float32 header storage alone costs about 1e-4 mm.
AFFINE_TOLERANCE = 1e-2


def load_mask(path: str | Path, volume: CTVolume) -> np.ndarray:
    """Mask as uint8 (z, y, x) matching `volume.array`.

    Accepts the seed layout (`.npz`, key `masks`, slices in ascending SliceLocation order, which
    is the order `load_series` uses for axial scans) and NIfTI label maps; a NIfTI stored in
    another axis order is reoriented onto the volume's voxel grid.
    """
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: mask file not found")
    if path.suffix == ".npz":
        mask = _load_npz(path)
    elif path.name.endswith((".nii", ".nii.gz")):
        mask = _load_nifti_mask(path, volume)
    else:
        raise MaskError(f"{path}: unknown mask format (expected .npz or .nii/.nii.gz)")
    if mask.shape != volume.shape:
        raise MaskError(f"{path}: mask shape {mask.shape} (z, y, x) does not match the image "
                        f"volume {volume.shape}")
    return _to_uint8(mask, path)


def _load_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path) as archive:
            if "masks" not in archive.files:
                raise MaskError(f"{path}: no 'masks' array (found {', '.join(archive.files)})")
            mask = archive["masks"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise MaskError(f"{path}: unreadable mask file ({exc})") from exc
    if mask.ndim != 3:
        raise MaskError(f"{path}: 'masks' has shape {mask.shape}, expected (slices, rows, cols)")
    return mask


def _load_nifti_mask(path: Path, volume: CTVolume) -> np.ndarray:
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise MaskError(f"{path}: unreadable NIfTI mask ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskError(f"{path}: expected a 3D label map, got shape {data.shape}")
    affine = image.affine
    source = orientations.io_orientation(affine)
    target = orientations.io_orientation(volume.affine)
    if not np.array_equal(source, target):
        transform = orientations.ornt_transform(source, target)
        affine = affine @ orientations.inv_ornt_aff(transform, data.shape)
        data = orientations.apply_orientation(data, transform)
    if data.shape == volume.shape[::-1] and not np.allclose(affine, volume.affine, rtol=0,
                                                            atol=AFFINE_TOLERANCE):
        raise MaskError(f"{path}: mask geometry does not match the image (origin "
                        f"{np.round(affine[:3, 3], 2).tolist()} vs "
                        f"{np.round(volume.affine[:3, 3], 2).tolist()} mm, voxel axes "
                        f"{np.round(affine[:3, :3], 3).tolist()} vs "
                        f"{np.round(volume.affine[:3, :3], 3).tolist()})")
    return np.asarray(data).transpose(2, 1, 0)


def _to_uint8(mask: np.ndarray, path: Path) -> np.ndarray:
    if mask.dtype != bool:
        if np.issubdtype(mask.dtype, np.floating) and not np.all(np.rint(mask) == mask):
            raise MaskError(f"{path}: mask holds non-integer values")
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise MaskError(f"{path}: mask values {mask.min()}..{mask.max()} are not labels "
                            "in 0..255")
    return np.ascontiguousarray(mask, dtype=np.uint8)
