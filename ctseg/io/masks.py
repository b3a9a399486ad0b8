"""Label maps for a loaded volume, checked to fit it before anyone trains or scores on them."""

from __future__ import annotations

import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from ctseg.errors import MaskError
from ctseg.io.nifti import NIFTI_SUFFIXES
from ctseg.io.redact import show_path
from ctseg.io.volume import CTVolume

#: Largest affine difference (mm, and per direction-cosine unit) between a NIfTI mask and its
#: volume; float32 header storage alone costs about 1e-4 mm.
AFFINE_TOLERANCE = 1e-2


def load_mask(path: str | Path, volume: CTVolume) -> np.ndarray:
    """Mask as uint8 (z, y, x) matching `volume.array`.

    Accepts the seed layout (`.npz`, key `masks`, slices in ascending SliceLocation order, which
    is the order `load_series` uses for axial scans) and NIfTI label maps; a NIfTI stored in
    another axis order is reoriented onto the volume's voxel grid. The shape each file declares
    is checked against the volume before its voxels are read: a 95 kB file declaring
    2400x512x512 voxels is refused, not decompressed.
    """
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{show_path(path)}: mask file not found")
    if path.suffix == ".npz":
        mask = _load_npz(path, volume.shape)
    elif path.name.endswith(NIFTI_SUFFIXES):
        mask = _load_nifti_mask(path, volume)
    else:
        raise MaskError(f"{show_path(path)}: unknown mask format (expected .npz or .nii/.nii.gz)")
    _check_shape(mask.shape, volume.shape, path)
    return _to_uint8(mask, path)


def _check_shape(shape: tuple[int, ...], expected: tuple[int, ...], path: Path) -> None:
    if tuple(shape) != tuple(expected):
        raise MaskError(f"{show_path(path)}: mask shape {tuple(shape)} (z, y, x) does not match "
                        f"the image volume {tuple(expected)}")


def _load_npz(path: Path, expected: tuple[int, int, int]) -> np.ndarray:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
            if "masks" not in names:
                raise MaskError(f"{show_path(path)}: no 'masks' array (found {', '.join(names)})")
            with archive.open("masks.npy") as member:  # the .npy header, not the data
                version = np.lib.format.read_magic(member)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                        np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(member)
            if len(shape) != 3:
                raise MaskError(f"{show_path(path)}: 'masks' has shape {shape}, expected "
                                "(slices, rows, cols)")
            _check_shape(shape, expected, path)
            if dtype.hasobject:
                raise MaskError(f"{show_path(path)}: 'masks' holds Python objects, not labels")
        with np.load(path) as archive:
            return archive["masks"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise MaskError(f"{show_path(path)}: unreadable mask file ({exc})") from exc


def _load_nifti_mask(path: Path, volume: CTVolume) -> np.ndarray:
    try:
        image = nib.load(str(path))  # the header only; voxels are read on demand
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise MaskError(f"{show_path(path)}: unreadable NIfTI mask ({exc})") from exc
    shape = tuple(image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise MaskError(f"{show_path(path)}: expected a 3D label map, got shape {image.shape}")
    affine = image.affine
    source = orientations.io_orientation(affine)
    target = orientations.io_orientation(volume.affine)
    transform = orientations.ornt_transform(source, target)
    reoriented = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(transform):
        reoriented[int(new_axis)] = shape[axis]
    _check_shape(tuple(reoriented[::-1]), volume.shape, path)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # truncated or corrupt voxel data
        raise MaskError(f"{show_path(path)}: unreadable NIfTI mask ({exc})") from exc
    if data.ndim == 4:
        data = data[..., 0]
    if not np.array_equal(source, target):
        transform = orientations.ornt_transform(source, target)
        affine = affine @ orientations.inv_ornt_aff(transform, data.shape)
        data = orientations.apply_orientation(data, transform)
    if data.shape == volume.shape[::-1] and not np.allclose(affine, volume.affine, rtol=0,
                                                            atol=AFFINE_TOLERANCE):
        raise MaskError(f"{show_path(path)}: mask geometry does not match the image (origin "
                        f"{np.round(affine[:3, 3], 2).tolist()} vs "
                        f"{np.round(volume.affine[:3, 3], 2).tolist()} mm, voxel axes "
                        f"{np.round(affine[:3, :3], 3).tolist()} vs "
                        f"{np.round(volume.affine[:3, :3], 3).tolist()})")
    return np.asarray(data).transpose(2, 1, 0)


def _to_uint8(mask: np.ndarray, path: Path) -> np.ndarray:
    if mask.dtype != bool:
        if np.issubdtype(mask.dtype, np.floating) and not np.all(np.rint(mask) == mask):
            raise MaskError(f"{show_path(path)}: mask holds non-integer values")
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise MaskError(f"{show_path(path)}: mask values {mask.min()}..{mask.max()} are not labels "
                            "in 0..255")
    return np.ascontiguousarray(mask, dtype=np.uint8)
