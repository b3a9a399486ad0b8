"""NIfTI in and out with the conventions of `CTVolume`: array (z, y, x), RAS affine on (x, y, z).

Written files carry the same affine in sform and qform (code 1, scanner), so 3D Slicer, ITK and
nibabel all place them on the same anatomy as the DICOM series they came from.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from ctseg.errors import CTSegError, MaskError
from ctseg.io.volume import CTVolume
from ctseg.utils import atomic_path

#: The file names read and written as NIfTI (the one definition: inputs, masks, predictions).
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def nifti_stem(path: str | Path) -> str | None:
    """The case name of a NIfTI file (`case.nii.gz` -> `case`), or None for other files."""
    name = Path(path).name
    suffix = next((s for s in NIFTI_SUFFIXES if name.endswith(s)), None)
    return name[: -len(suffix)] if suffix else None

_INT16 = np.iinfo(np.int16)


def save_nifti(array_zyx: np.ndarray, affine: np.ndarray, path: str | Path,
               kind: str = "auto") -> Path:
    """Write `array_zyx` atomically as NIfTI (gzip for .nii.gz, plain for .nii).

    kind "image" stores HU as int16 (rounded, clipped); "label" stores uint8 label values;
    "auto" picks image for float arrays and label for integer/bool ones.
    """
    path = Path(path)
    if not path.name.endswith((".nii.gz", ".nii")):
        raise CTSegError(f"{path}: a NIfTI file name ends in .nii.gz (or .nii)")
    array = np.asarray(array_zyx)
    if array.ndim != 3:
        raise CTSegError(f"{path}: expected a (z, y, x) array, got shape {array.shape}")
    if kind == "auto":
        kind = "image" if np.issubdtype(array.dtype, np.floating) else "label"
    if kind == "image":
        data = np.clip(np.rint(array), _INT16.min, _INT16.max).astype(np.int16)
    elif kind == "label":
        data = _as_labels(array, path)
    else:
        raise CTSegError(f"save_nifti: kind must be 'auto', 'image' or 'label', not {kind!r}")
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_slope_inter(1.0, 0.0)
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        # mtime=0: the same volume always gives the same bytes.
        payload = gzip.compress(payload, compresslevel=1, mtime=0)
    # Written as bytes because nibabel infers compression from the (temporary) file name.
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return path


def _as_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.rint(array) == array):
        raise MaskError(f"{path}: label values must be integers")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise MaskError(f"{path}: label values {array.min()}..{array.max()} do not fit uint8; "
                        "pass kind='image' for HU volumes")
    return array.astype(np.uint8)


def load_nifti(path: str | Path) -> CTVolume:
    """Read a 3D NIfTI as a `CTVolume` (float32 values, array (z, y, x), affine as stored)."""
    path = Path(path)
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise CTSegError(f"{path}: unreadable NIfTI file ({exc})") from exc
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    elif len(shape) != 3:
        raise CTSegError(f"{path}: expected a 3D image, got shape {shape}")
    data = np.asarray(image.get_fdata(dtype=np.float32))
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CTSegError(f"{path}: the affine {np.round(affine, 3).tolist()} does not place "
                         "voxels in space (not finite, or a zero voxel size)")
    bad = np.count_nonzero(~np.isfinite(data))
    if bad:  # a network sees NaN as NaN: refuse rather than predict or train on them
        raise CTSegError(f"{path}: {bad} voxels are NaN or infinite; fill them (e.g. with "
                         "-1024 HU outside the field of view) before using the image")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    metadata = {"series_uid": None, "modality": None, "manufacturer": None, "kernel": None,
                "order_key": "nifti"}
    return CTVolume(np.ascontiguousarray(data.transpose(2, 1, 0)), affine,
                    (float(zooms[2]), float(zooms[1]), float(zooms[0])), [path], metadata)
