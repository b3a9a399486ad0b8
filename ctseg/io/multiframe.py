"""One multi-frame (Enhanced or Legacy Converted Enhanced) CT file → `CTVolume`.

Geometry and rescale live in functional groups, per frame or shared, not in top-level tags.
Each frame becomes a `SliceHeader`, so frames are ordered, checked (gaps, duplicates, mixed
geometry, plausible HU) and placed by exactly the code that handles one file per slice.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom

from ctseg.errors import DicomError
from ctseg.io.dicom import _check_values, assemble
from ctseg.io.dicom_headers import (_ENHANCED_SOP_CLASSES, MAX_FILE_PIXEL_BYTES, MAX_IMAGE_SIDE,
                                    SliceHeader, _check_orientation, open_regular)
from ctseg.io.memory import check_memory
from ctseg.io.redact import show_path
from ctseg.io.volume import CTVolume


def is_multiframe(path: str | Path) -> bool:
    """True for a file of one of the enhanced (multi-frame) image storage classes."""
    try:
        with open_regular(Path(path)) as fp:
            ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM: not a multi-frame file either (its loader says what it is)
        return False
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    return sop_class in _ENHANCED_SOP_CLASSES


def load_multiframe(path: str | Path) -> CTVolume:
    """Read a multi-frame CT file; its size is checked against available memory first."""
    path = Path(path)
    name = show_path(path)
    with open_regular(path) as fp:
        try:
            ds = pydicom.dcmread(fp, force=True, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on garbage
            raise DicomError(f"{name}: unreadable DICOM file ({exc})") from exc
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    bits, representation = ds.get("BitsAllocated"), ds.get("PixelRepresentation")
    if not rows or not cols or bits not in (8, 16, 32) or representation not in (0, 1):
        raise DicomError(f"{name}: Rows, Columns, BitsAllocated or PixelRepresentation missing "
                         "or unsupported")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise DicomError(f"{name}: {ds.SamplesPerPixel} samples per pixel; CT is grayscale")
    if max(rows, cols) > MAX_IMAGE_SIDE:
        raise DicomError(f"{name}: declares {rows}x{cols} pixels, more than {MAX_IMAGE_SIDE} a "
                         "side; a corrupt header?")
    nbytes = rows * cols * frames * bits // 8
    if nbytes > MAX_FILE_PIXEL_BYTES:
        raise DicomError(f"{name}: declares {nbytes / 2**30:.1f} GiB of pixels, more than "
                         f"{MAX_FILE_PIXEL_BYTES / 2**30:.0f} GiB per file")
    # the float32 volume; the encoded and the decoded pixels while pydicom decodes them
    check_memory(frames * rows * cols * 4 + 2 * nbytes, f"{frames} frames of {rows}x{cols}", name,
                 DicomError)
    headers = [_frame_header(ds, i, path) for i in range(frames)]
    index = {h.path: i for i, h in enumerate(headers)}

    def read_hu(ordered: list[SliceHeader]) -> np.ndarray:
        with open_regular(path) as fp:
            try:
                pixels = pydicom.dcmread(fp, force=True).pixel_array
            except Exception as exc:  # decoders raise many types
                raise DicomError(f"{name}: cannot decode pixel data ({exc})") from exc
        if pixels.size != frames * rows * cols:
            raise DicomError(f"{name}: decoded pixels have shape {pixels.shape}, header says "
                             f"{frames} frames of {rows}x{cols}")
        pixels = pixels.reshape(frames, rows, cols)
        out = np.empty((len(ordered), rows, cols), dtype=np.float32)
        for k, h in enumerate(ordered):
            stored = pixels[index[h.path]]
            _check_values(stored, h)
            np.multiply(stored, np.float32(h.slope), out=out[k], dtype=np.float32)
            out[k] += np.float32(h.intercept)
        return out

    volume = assemble(headers, path, read_hu)
    volume.files = [path]
    return volume


def _frame_header(ds: pydicom.Dataset, i: int, path: Path) -> SliceHeader:
    """Frame `i` as a slice: per-frame functional groups first, then shared, then top level."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    where = path / f"frame {i + 1}"

    def value(sequence: str, keyword: str):
        for groups in (per_frame[i] if i < len(per_frame) else None,
                       shared[0] if shared else None):
            items = groups.get(sequence) if groups is not None else None
            if items and keyword in items[0]:
                return items[0].get(keyword)
        return ds.get(keyword)

    def floats(sequence: str, keyword: str, n: int) -> tuple[float, ...] | None:
        raw = value(sequence, keyword)
        if raw is None or raw == "":
            return None
        result = tuple(float(x) for x in (raw if n > 1 else [raw]))
        if len(result) != n or not all(math.isfinite(x) for x in result):
            raise DicomError(f"{show_path(where)}: {keyword} {list(result)} is not {n} finite "
                             "numbers")
        return result

    orientation = floats("PlaneOrientationSequence", "ImageOrientationPatient", 6)
    error = 0.0
    if orientation is not None:
        orientation, error = _check_orientation(orientation, where)
    spacing = floats("PixelMeasuresSequence", "PixelSpacing", 2)
    if spacing is not None and min(spacing) <= 0:
        raise DicomError(f"{show_path(where)}: PixelSpacing {list(spacing)} is not positive")
    slope = floats("PixelValueTransformationSequence", "RescaleSlope", 1)
    intercept = floats("PixelValueTransformationSequence", "RescaleIntercept", 1)
    if slope is not None and slope[0] == 0:
        raise DicomError(f"{show_path(where)}: RescaleSlope is 0")
    thickness = floats("PixelMeasuresSequence", "SliceThickness", 1)
    between = floats("PixelMeasuresSequence", "SpacingBetweenSlices", 1)
    bits = int(ds.BitsAllocated)
    return SliceHeader(
        path=where, series_uid=str(ds.get("SeriesInstanceUID") or ""),
        modality=str(ds.get("Modality") or ""), manufacturer=str(ds.get("Manufacturer") or ""),
        kernel="", rows=int(ds.Rows), cols=int(ds.Columns), pixel_spacing=spacing,
        orientation=orientation,
        position=floats("PlanePositionSequence", "ImagePositionPatient", 3),
        slice_location=None, instance_number=i + 1,
        slice_thickness=thickness[0] if thickness else None,
        spacing_between_slices=between[0] if between else None, tilt=0.0,
        slope=slope[0] if slope else 1.0, intercept=intercept[0] if intercept else 0.0,
        bits_allocated=bits, bits_stored=int(ds.get("BitsStored") or bits),
        signed=int(ds.PixelRepresentation) == 1, pixel_offset=None,
        description=str(ds.get("SeriesDescription") or ""), orientation_error=error, decoded=True)
