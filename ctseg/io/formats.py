"""Any supported input → `CTVolume`: DICOM series folders and files, NIfTI, NRRD, MHA/MHD.

Every format ends in the same conventions as the DICOM loader: a (z, y, x) float32 array of
stored values taken as HU, and a RAS affine on (x, y, z) voxel indices. NRRD and MetaImage
carry LPS geometry (origin, spacing, direction cosines) as DICOM does, so SimpleITK reads them
and the LPS -> RAS flip is the one `ctseg.io.dicom` applies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctseg.errors import CTSegError
from ctseg.io.dicom import list_files, load_series
from ctseg.io.dicom_headers import open_regular
from ctseg.io.memory import check_memory
from ctseg.io.multiframe import is_multiframe, load_multiframe
from ctseg.io.nifti import NIFTI_SUFFIXES, load_nifti
from ctseg.io.redact import show_path
from ctseg.io.volume import CTVolume

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: File names taken as one case's image; any other file is read as DICOM.
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_stem(path: str | Path) -> str | None:
    """The case name of an image file (`scan.nrrd` -> `scan`), or None for other files."""
    name = Path(path).name
    lower = name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), None)
    return name[: -len(suffix)] if suffix else None


def is_image_file(path: str | Path) -> bool:
    """An image file name (NIfTI, NRRD, MetaImage), or a regular file with the DICOM preamble."""
    if image_stem(path) is not None:
        return True
    try:
        with open_regular(Path(path)) as fp:
            return fp.read(132)[128:132] == b"DICM"
    except CTSegError:
        return False


def load_image(path: str | Path, series: str | int | None = None) -> CTVolume:
    """A CT volume from a DICOM folder (`series` as in `load_series`), a NIfTI, NRRD or
    MetaImage file, a multi-frame (enhanced) CT DICOM file (alone, or alone in its folder) or a
    single DICOM slice."""
    path = Path(path)
    if path.is_dir():
        files = [f for f in list_files(path) if f.name.upper() != "DICOMDIR"]
        if len(files) == 1 and series is None and is_multiframe(files[0]):
            return load_multiframe(files[0])
        return load_series(path, series)
    if not path.exists():
        raise CTSegError(f"{show_path(path)}: no such file or folder")
    lower = path.name.lower()
    if lower.endswith(NIFTI_SUFFIXES):
        open_regular(path).close()
        return load_nifti(path)
    if lower.endswith(ITK_SUFFIXES):
        return load_itk(path)
    if is_multiframe(path):
        return load_multiframe(path)
    return load_series(path, series)


def load_itk(path: str | Path) -> CTVolume:
    """NRRD or MetaImage through SimpleITK; size checked from the header before reading."""
    import SimpleITK as sitk  # here: `import ctseg.io` stays light

    path = Path(path)
    name = show_path(path)
    open_regular(path).close()  # a FIFO named scan.nrrd must not block the reader
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:  # ITK reports every failure as RuntimeError
        raise CTSegError(f"{name}: unreadable image file ({_first_line(exc)})") from exc
    size = reader.GetSize()
    if len(size) == 4 and size[3] == 1:
        size = size[:3]
    if len(size) != 3 or reader.GetNumberOfComponents() != 1:
        raise CTSegError(f"{name}: expected a 3D grayscale image, got size {reader.GetSize()} "
                         f"with {reader.GetNumberOfComponents()} components")
    voxels = int(np.prod(size, dtype=np.int64))
    # the float32 volume and the stored values (up to 8 bytes a voxel) while converting
    check_memory(voxels * 12, f"an image of {'x'.join(map(str, size))} voxels", name)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise CTSegError(f"{name}: unreadable image file ({_first_line(exc)})") from exc
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    array = sitk.GetArrayViewFromImage(image).astype(np.float32)
    bad = np.count_nonzero(~np.isfinite(array))
    if bad:
        raise CTSegError(f"{name}: {bad} voxels are NaN or infinite; fill them (e.g. with "
                         "-1024 HU outside the field of view) before using the image")
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * spacing
    lps[:3, 3] = image.GetOrigin()
    affine = _LPS_TO_RAS @ lps
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CTSegError(f"{name}: the geometry does not place voxels in space (not finite, or "
                         "a zero voxel size)")
    metadata = {"series_uid": None, "modality": None, "manufacturer": None, "kernel": None,
                "order_key": path.suffix.lower().lstrip(".")}
    return CTVolume(np.ascontiguousarray(array), affine,
                    (float(spacing[2]), float(spacing[1]), float(spacing[0])), [path], metadata)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__

