"""One DICOM file's header → `SliceHeader` (or the reason it is not a slice), without pixels.

Header parsing is most of a series load, and pydicom (pure Python, building a Dataset per
sequence item) costs about 0.5 ms a file even when told to read only some tags. For the
common case (preamble, file meta, an uncompressed or encapsulated dataset in one of the three
standard encodings) the top-level elements are therefore scanned here straight from the bytes:
wanted values are kept, everything else, sequences included, is stepped over by its length or
its delimiters. Anything the scanner does not expect (no preamble, deflate, malformed VRs) goes
to pydicom, which stays the reference: tests check both paths give the same values.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.filereader
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian)

from ctseg.errors import DicomError
from ctseg.io.redact import show_path

log = logging.getLogger(__name__)

#: Bytes read up front; a CT header is a few kB, longer ones are read in full.
_HEAD_BYTES = 1 << 15
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # (float, double) pixel data
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_NATIVE_SYNTAXES = frozenset({"", ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                              ExplicitVRBigEndian})

#: Objects that may share a folder with a CT series but are not slices of it.
_NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.1.3.10": "DICOMDIR",
    "1.2.840.10008.5.1.4.1.1.481.1": "RT Image",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.481.5": "RT Plan",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}
_RT_SOP_CLASS_ROOT = "1.2.840.10008.5.1.4.1.1.481."
#: Multi-frame classes whose geometry lives in per-frame functional groups, not in the top-level
#: tags this reader uses; they are refused by name rather than misread.
_ENHANCED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET",
}
#: CT, MR and PET image classes: such a file without pixel data is truncated, not "no image".
_VOLUME_IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1",  # CT, Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",  # MR, Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",  # PET, Enhanced PET
})

#: Only these are read from each header; everything else (names, IDs, dates) stays on disk.
HEADER_KEYWORDS = [
    "SOPClassUID", "ImageType", "Modality", "Manufacturer", "ConvolutionKernel",
    "GantryDetectorTilt", "SeriesInstanceUID", "InstanceNumber", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceLocation", "SliceThickness", "SpacingBetweenSlices",
    "SamplesPerPixel", "NumberOfFrames", "Rows", "Columns", "PixelSpacing", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
    # what tells series apart when an anonymiser blanked their UIDs
    "StudyInstanceUID", "StudyDescription", "SeriesDescription", "SeriesNumber",
    "AcquisitionNumber",
]
_TAGS = {k: int(pydicom.tag.Tag(k)) for k in HEADER_KEYWORDS}
_WANTED = frozenset(_TAGS.values())
_US_KEYWORDS = frozenset({"SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored",
                          "PixelRepresentation"})
_META_SOP_CLASS = 0x00020002
_META_SYNTAX = 0x00020010
#: File names that claim to be DICOM: such a file that does not parse is refused, not skipped,
#: because it is most likely a slice that was cut short or replaced in transfer.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
#: Largest accepted Rows or Columns. CT slices are 512 to 2048 pixels a side; the limit keeps a
#: corrupt (or hostile: a deflated blank 8192x8192 slice is 100 kB) header from making a decoder
#: allocate hundreds of megabytes per file before the mismatch shows.
MAX_IMAGE_SIDE = 4096
#: Largest decoded pixel data of one file (Rows x Columns x frames x bytes): a multi-frame CT of
#: 2000 frames of 512x512 int16 is 1 GiB.
MAX_FILE_PIXEL_BYTES = 2 * 2**30
#: Tolerance on ImageOrientationPatient's two direction cosines being unit length and orthogonal.
ORIENTATION_TOLERANCE = 1e-2
#: Deviation from unit length above which the (then normalised) direction cosines are reported.
ORIENTATION_WARN = 1e-4
#: Largest inflated header read from a deflated file before its pixel data must have started.
_MAX_DEFLATED_HEADER = 1 << 22


@dataclass(frozen=True)
class SliceHeader:
    """What ordering, validation and pixel reading need from one image file."""

    path: Path
    #: "" when an anonymiser blanked it: the series is then told apart by `group_key`.
    series_uid: str
    modality: str
    manufacturer: str
    kernel: str
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    slice_location: float | None
    instance_number: int | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    tilt: float
    slope: float
    intercept: float
    bits_allocated: int
    bits_stored: int
    signed: bool
    #: Byte offset of native little-endian pixel data; None means "decode with pydicom"
    #: (compressed or big-endian transfer syntaxes).
    pixel_offset: int | None
    study_uid: str = ""
    study_description: str = ""
    description: str = ""
    series_number: int | None = None
    acquisition_number: int | None = None
    #: ImageType says DERIVED or SECONDARY (a reformat, MIP, ...): never chosen automatically.
    derived: bool = False
    #: How far ImageOrientationPatient's cosines were from unit length before normalising.
    orientation_error: float = 0.0
    #: True for a compressed (or deflated) file that pydicom decodes whole.
    decoded: bool = False

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<{'i' if self.signed else 'u'}{self.bits_allocated // 8}")

    @property
    def acquisition_key(self) -> tuple:
        """The series UID, or without one what an anonymiser leaves of the acquisition."""
        if self.series_uid:
            return ("uid", self.series_uid)
        return ("blank", self.study_uid, self.study_description, self.description,
                self.series_number, self.acquisition_number, self.modality)

    @property
    def group_key(self) -> tuple:
        """What puts files in one series: the UID, or without one acquisition and geometry."""
        if self.series_uid:
            return self.acquisition_key
        return (*self.acquisition_key, tuple(np.round(self.orientation or (), 3)), self.rows,
                self.cols, tuple(np.round(self.pixel_spacing or (), 3)))


@dataclass
class RawHeader:
    """Wanted elements' raw values, the dataset encoding, and where pixel data starts."""

    values: dict[int, object]  # tag -> value bytes (or an already converted pydicom value)
    syntax: str
    implicit: bool
    little: bool
    pixel_pos: int | None  # offset of the pixel data element's tag; None: no pixel data


class _UsePydicom(Exception):
    """The byte scanner met something it leaves to pydicom."""


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


class _Unparsable(Exception):
    """pydicom could not parse the file."""


def read_header(path: Path) -> SliceHeader | str:
    """A `SliceHeader`, or a string saying why the file is not a slice of an image series.

    Raises `DicomError` for DICOM files that cannot be trusted (unreadable, truncated,
    multi-frame, colour).
    """
    magic = False
    fp = open_regular(path)
    try:
        with fp:
            size = os.fstat(fp.fileno()).st_size
            data = fp.read(_HEAD_BYTES)
            magic = data[128:132] == b"DICM"
            if not magic and not _looks_like_raw_dicom(data):
                return _not_dicom(path, size, "not a DICOM file")
            try:
                if not magic:
                    raise _UsePydicom
                try:
                    raw = scan_header(data, size, fp)
                except _NeedMore:
                    raw = scan_header(data + fp.read(), size, fp)
            except _UsePydicom:
                fp.seek(0)
                try:
                    raw = pydicom_header(fp)
                except Exception as exc:  # pydicom raises many types on garbage; all mean this
                    raise _Unparsable(exc) from exc
            return _slice_header(path, raw, fp, size, magic)
    except DicomError:
        raise
    except (_Unparsable, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError,
            struct.error) as exc:
        if not magic:  # it only looked like preamble-less DICOM
            return _not_dicom(path, size, "not a DICOM file (no preamble, does not parse)")
        raise DicomError(f"{show_path(path)}: unreadable DICOM file ({exc})") from exc


def open_regular(path: Path):
    """`path` opened for binary reading, refused unless it is a regular file.

    Opened non-blocking and checked with fstat on the open descriptor (no window for a swap):
    a FIFO named `x.dcm` would otherwise block the read forever, a device node never end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:  # permissions, a vanished file, I/O errors: never skipped quietly
        raise DicomError(f"{show_path(path)}: cannot read file ({exc.strerror or exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DicomError(f"{show_path(path)}: not a regular file ({file_kind(mode)}); only files "
                         "are read")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def file_kind(mode: int) -> str:
    """A word for a non-regular file type, for the messages that skip or refuse it."""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"))
    return next((word for test, word in kinds if test(mode)), "not a regular file")


def _not_dicom(path: Path, size: int, reason: str) -> str:
    """The note for a skipped non-DICOM file; a file *named* like DICOM is refused instead."""
    reason = "empty file (0 bytes)" if size == 0 else reason
    if path.name.lower().endswith(DICOM_SUFFIXES):
        raise DicomError(f"{show_path(path)}: named like a DICOM file but {reason}; an incomplete copy? "
                         "Replace or remove it")
    return reason


def _looks_like_raw_dicom(head: bytes) -> bool:
    """DICOM without preamble (old exports) starts with a group 0x0008 element."""
    return len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x00\x08")


# --------------------------------------------------------------------------- byte scanner

def scan_header(data: bytes, size: int, fp=None) -> RawHeader:
    """Scan file meta and top-level dataset elements of a file with preamble (`data` from 0).

    A deflated dataset is inflated from `fp` only as far as its pixel data (without `fp` it is
    left to pydicom, which inflates the whole file first).
    """
    meta, pos = _scan(data, 132, size, implicit=False, endian="<", meta=True)
    syntax = _text(meta.get(_META_SYNTAX, b""))
    if syntax == ImplicitVRLittleEndian:
        implicit, endian = True, "<"
    elif syntax == ExplicitVRBigEndian:
        implicit, endian = False, ">"
    elif syntax == DeflatedExplicitVRLittleEndian and fp is not None:
        values, pixel_pos = _scan_deflated(fp, pos)
        _sop_class_from_meta(values, meta.get(_META_SOP_CLASS))
        return RawHeader(values, syntax, False, True, pixel_pos)
    elif not syntax or syntax == DeflatedExplicitVRLittleEndian:
        raise _UsePydicom
    else:  # explicit VR little endian, natively or around encapsulated (compressed) pixels
        implicit, endian = False, "<"
    values, pixel_pos = _scan(data, pos, size, implicit=implicit, endian=endian, meta=False)
    _sop_class_from_meta(values, meta.get(_META_SOP_CLASS))
    return RawHeader(values, syntax, implicit, endian == "<", pixel_pos)


def _sop_class_from_meta(values: dict[int, object], meta_class: object) -> None:
    """An absent or empty SOP Class UID (anonymisers blank it) is taken from the file meta."""
    tag = _TAGS["SOPClassUID"]
    current = values.get(tag)
    if meta_class and (current is None or not str(
            current.decode("latin-1") if isinstance(current, bytes) else current).strip(" \x00")):
        values[tag] = meta_class


def _scan_deflated(fp, start: int) -> tuple[dict[int, bytes], int | None]:
    """Scan a deflated dataset, inflating 64 kB at a time only until its pixel data starts.

    The returned pixel position is an offset in the inflated stream: it only says pixels exist
    (pydicom decodes such files). Inflating everything first, as pydicom does, costs the full
    decoded size, which is how a 100 kB file becomes 128 MB.
    """
    fp.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    data, pending, finished = b"", b"", False
    while True:
        if not pending and not finished:
            pending = fp.read(1 << 16)
            finished = not pending
        if pending:
            try:
                data += inflater.decompress(pending, 1 << 16)
            except zlib.error as exc:
                raise EOFError(f"deflated data is corrupt ({exc})") from exc
            pending = inflater.unconsumed_tail
        done = finished or inflater.eof
        try:
            return _scan(data, 0, len(data) if done else len(data) + 1, implicit=False,
                         endian="<", meta=False)
        except _NeedMore:
            if len(data) > _MAX_DEFLATED_HEADER:
                raise EOFError("no pixel data within the first 4 MB of inflated header") from None


def _scan(data: bytes, pos: int, size: int, *, implicit: bool, endian: str,
          meta: bool) -> tuple[dict[int, bytes], int | None]:
    """Walk elements from `pos`: wanted raw values, and where the walk stopped.

    In `meta` mode (group 0002, always explicit little endian) every value is kept and the walk
    stops at the first other group; otherwise it stops at the pixel data element (returning its
    offset) or the end of the file (returning None).
    """
    tag_at = struct.Struct(endian + "HH").unpack_from
    u16_at = struct.Struct(endian + "H").unpack_from
    u32_at = struct.Struct(endian + "I").unpack_from
    end = len(data)
    values: dict[int, bytes] = {}
    while True:
        if pos + 8 > end:
            if end < size:
                raise _NeedMore
            if pos == end:
                return values, (pos if meta else None)
            raise EOFError("file ends inside a data element header")
        group, elem = tag_at(data, pos)
        tag = group << 16 | elem
        if meta and group != 0x0002:
            return values, pos
        if not meta and tag in _PIXEL_TAGS:
            return values, pos
        if implicit:
            length, start = u32_at(data, pos + 4)[0], pos + 8
        else:
            vr = data[pos + 4:pos + 6]
            if not (vr.isalpha() and vr.isupper()):
                raise _UsePydicom  # not the explicit VR the transfer syntax promised
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _NeedMore if end < size else EOFError("file ends inside a header")
                length, start = u32_at(data, pos + 8)[0], pos + 12
            else:
                length, start = u16_at(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED:
            # a sequence sent as UN is encoded implicit little endian inside (PS3.5 6.2.2)
            un = not implicit and vr == b"UN"
            pos = _skip_undefined(data, start, size, implicit or un, "<" if un else endian)
            continue
        stop = start + length
        if stop > end:
            if end < size:
                raise _NeedMore
            raise EOFError(f"file ends inside element ({group:04X},{elem:04X})")
        if meta or tag in _WANTED:
            values[tag] = data[start:stop]
        pos = stop


def _skip_undefined(data: bytes, pos: int, size: int, implicit: bool, endian: str) -> int:
    """Offset just past an undefined-length value (a sequence, or encapsulated data).

    Items of defined length are jumped over; inside undefined-length items, elements are
    stepped over one header at a time; each undefined-length container ends with a delimiter.
    """
    tag_at = struct.Struct(endian + "HH").unpack_from
    u16_at = struct.Struct(endian + "H").unpack_from
    u32_at = struct.Struct(endian + "I").unpack_from
    end = len(data)

    def need(n: int) -> None:
        if pos + n > end:
            if end < size:
                raise _NeedMore
            raise EOFError("file ends inside a sequence")

    depth = 1
    while depth:
        need(8)
        group, elem = tag_at(data, pos)
        if group == 0xFFFE:  # item, item delimiter or sequence delimiter: no VR
            length, pos = u32_at(data, pos + 4)[0], pos + 8
            if elem != 0xE000:
                depth -= 1
            elif length == _UNDEFINED:
                depth += 1
            else:
                pos += length
            continue
        if implicit:
            length, pos = u32_at(data, pos + 4)[0], pos + 8
        elif data[pos + 4:pos + 6] in _LONG_VRS:
            need(12)
            length, pos = u32_at(data, pos + 8)[0], pos + 12
        else:
            length, pos = u16_at(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED:
            depth += 1
        else:
            pos += length
    return pos


# --------------------------------------------------------------------------- pydicom path

def _stop(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS or (length == _UNDEFINED and tag not in _WANTED)


def pydicom_header(fp) -> RawHeader:
    """The same as `scan_header`, through pydicom (any file pydicom can read with force=True).

    Unwanted undefined-length sequences are still stepped over at byte level: pydicom would
    build a Dataset for each of their items.
    """
    tags = [pydicom.tag.Tag(t) for t in _WANTED]
    ds = pydicom.filereader.read_partial(fp, stop_when=_stop, force=True, specific_tags=tags)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # pydicom inflated the dataset into a buffer of its own: offsets in `fp` mean nothing,
        # so read the (rare) deflated file whole; its pixels are decoded by pydicom anyway.
        fp.seek(0)
        ds = pydicom.dcmread(fp, force=True)
        has_pixels = any(t in ds for t in _PIXEL_TAGS)
        return RawHeader(_pydicom_values(ds), DeflatedExplicitVRLittleEndian, False, True,
                         0 if has_pixels else None)
    implicit, little = ds.original_encoding
    endian = "<" if little else ">"
    while True:
        start = fp.tell()
        head = fp.read(12)
        if len(head) < 8:
            fp.seek(start)
            break
        group, elem = struct.unpack(endian + "HH", head[:4])
        if (group << 16 | elem) in _PIXEL_TAGS:
            fp.seek(start)
            break
        # an unwanted undefined-length element: _stop halted pydicom in front of it
        header = 8 if implicit or head[4:6] not in _LONG_VRS else 12
        un = not implicit and head[4:6] == b"UN"  # implicit little endian inside (PS3.5 6.2.2)
        rest = fp.read()
        after = _skip_undefined(head + rest, header, len(head) + len(rest), implicit or un,
                                "<" if un else endian)
        fp.seek(start + after)
        ds.update(pydicom.filereader.read_dataset(fp, implicit, little, stop_when=_stop,
                                                  specific_tags=tags))
    pixel_pos = fp.tell()
    fp.seek(0, os.SEEK_END)
    has_pixels = pixel_pos < fp.tell()
    syntax = str(file_meta.get("TransferSyntaxUID", "") or "") if file_meta is not None else ""
    return RawHeader(_pydicom_values(ds), syntax, implicit, little,
                     pixel_pos if has_pixels else None)


def _pydicom_values(ds: pydicom.Dataset) -> dict[int, object]:
    values = {t: ds.get_item(t).value for t in _WANTED if t in ds}
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        _sop_class_from_meta(values, str(file_meta.get("MediaStorageSOPClassUID", "") or ""))
    return values


# --------------------------------------------------------------------------- interpretation

def _slice_header(path: Path, raw: RawHeader, fp, size: int, magic: bool) -> SliceHeader | str:
    v = _Values(raw)
    sop_class = v.text("SOPClassUID")
    if not sop_class:
        if not magic:
            return "not a DICOM file (no preamble, no SOP Class UID)"
        raise DicomError(f"{show_path(path)}: unreadable DICOM file (no SOP Class UID in the dataset nor in "
                         "the file meta: corrupt or not DICOM)")
    if sop_class in _NON_VOLUME_SOP_CLASSES:
        return f"{_NON_VOLUME_SOP_CLASSES[sop_class]} object"
    if sop_class.startswith(_RT_SOP_CLASS_ROOT):
        return "radiotherapy object"
    image_type = [t.upper() for t in v.strings("ImageType")]
    if "LOCALIZER" in image_type:
        return "localizer (scout) image"
    if sop_class in _ENHANCED_SOP_CLASSES:
        raise DicomError(f"{show_path(path)}: {_ENHANCED_SOP_CLASSES[sop_class]} Image Storage (multi-frame, "
                         "geometry per frame) is not read as part of a folder; give the file "
                         "itself as the input, or export the series as one CT image file per slice")
    if raw.pixel_pos is None:
        if v.int("Rows") or sop_class in _VOLUME_IMAGE_SOP_CLASSES:
            raise DicomError(f"{show_path(path)}: image header but no pixel data (truncated file?)")
        return "no pixel data (not an image)"
    rows, cols = v.int("Rows"), v.int("Columns")
    if not rows or not cols:
        raise DicomError(f"{show_path(path)}: image without Rows or Columns")
    if max(rows, cols) > MAX_IMAGE_SIDE:
        raise DicomError(f"{show_path(path)}: declares {rows}x{cols} pixels, more than {MAX_IMAGE_SIDE} a "
                         "side; a corrupt header?")
    samples = v.int("SamplesPerPixel")
    samples, frames = 1 if samples is None else samples, v.int("NumberOfFrames") or 1
    if samples != 1:
        raise DicomError(f"{show_path(path)}: {samples} samples per pixel; a CT slice is grayscale")
    decoded_bytes = rows * cols * max(frames, 1) * max(v.int("BitsAllocated") or 16, 8) // 8
    if decoded_bytes > MAX_FILE_PIXEL_BYTES:
        raise DicomError(f"{show_path(path)}: declares {decoded_bytes / 2**30:.1f} GiB of pixels, more than "
                         f"{MAX_FILE_PIXEL_BYTES / 2**30:.0f} GiB per file; a corrupt header?")
    if frames != 1:
        raise DicomError(f"{show_path(path)}: multi-frame image ({frames} frames) is not supported; "
                         "export the series as one file per slice")
    bits_allocated, representation = v.int("BitsAllocated"), v.int("PixelRepresentation")
    if bits_allocated is None or representation is None:
        # Guessing either would misread every pixel (signed -1000 read unsigned is 64536).
        raise DicomError(f"{show_path(path)}: BitsAllocated or PixelRepresentation missing; the pixel "
                         "values cannot be read")
    if bits_allocated not in (8, 16, 32):
        raise DicomError(f"{show_path(path)}: BitsAllocated {bits_allocated} is not supported")
    if representation not in (0, 1):
        raise DicomError(f"{show_path(path)}: PixelRepresentation {representation} is neither 0 "
                         "(unsigned) nor 1 (signed)")
    bits_stored = v.int("BitsStored")
    bits_stored = bits_allocated if bits_stored is None else bits_stored
    if not 1 <= bits_stored <= bits_allocated:
        raise DicomError(f"{show_path(path)}: BitsStored {bits_stored} does not fit BitsAllocated "
                         f"{bits_allocated}")
    nbytes = rows * cols * bits_allocated // 8
    slope, intercept = v.float("RescaleSlope", path), v.float("RescaleIntercept", path)
    if (slope is None) != (intercept is None):
        raise DicomError(f"{show_path(path)}: RescaleSlope and RescaleIntercept come as a pair; only "
                         f"{'RescaleIntercept' if slope is None else 'RescaleSlope'} is present")
    if slope == 0:
        raise DicomError(f"{show_path(path)}: RescaleSlope is 0; every pixel would have the same value")
    pixel_spacing = v.floats("PixelSpacing", 2, path)
    if pixel_spacing is not None and min(pixel_spacing) <= 0:
        raise DicomError(f"{show_path(path)}: PixelSpacing {list(pixel_spacing)} is not positive")
    orientation = v.floats("ImageOrientationPatient", 6, path)
    orientation_error = 0.0
    if orientation is not None:
        orientation, orientation_error = _check_orientation(orientation, path)
    return SliceHeader(
        path=path,
        series_uid=v.text("SeriesInstanceUID"),
        modality=v.text("Modality"),
        manufacturer=v.text("Manufacturer"),
        kernel=v.text("ConvolutionKernel"),
        rows=rows,
        cols=cols,
        pixel_spacing=pixel_spacing,
        orientation=orientation,
        position=v.floats("ImagePositionPatient", 3, path),
        slice_location=v.float("SliceLocation", path),
        instance_number=v.int("InstanceNumber"),
        slice_thickness=v.float("SliceThickness", path),
        spacing_between_slices=v.float("SpacingBetweenSlices", path),
        tilt=v.float("GantryDetectorTilt", path) or 0.0,
        slope=1.0 if slope is None else slope,
        intercept=intercept or 0.0,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=representation == 1,
        pixel_offset=(offset := _native_pixel_offset(path, raw, fp, size, nbytes)),
        study_uid=v.text("StudyInstanceUID"),
        study_description=v.text("StudyDescription"),
        description=v.text("SeriesDescription"),
        series_number=v.int("SeriesNumber"),
        acquisition_number=v.int("AcquisitionNumber"),
        derived=bool({"DERIVED", "SECONDARY"} & set(image_type[:2])),
        orientation_error=orientation_error,
        decoded=offset is None,
    )


class _Values:
    """The wanted elements' values, decoded straight from their bytes.

    pydicom's general element conversion (validation, hooks, value-representation classes)
    costs more than a whole header scan for these plain string and US values.
    """

    def __init__(self, raw: RawHeader) -> None:
        self.values = raw.values
        self.endian = "<" if raw.little else ">"

    def strings(self, keyword: str) -> list[str]:
        value = self.values.get(_TAGS[keyword])
        if value is None:
            return []
        if isinstance(value, bytes):
            if keyword in _US_KEYWORDS:
                count = len(value) // 2
                return [str(n) for n in struct.unpack(f"{self.endian}{count}H", value[:2 * count])]
            parts = value.decode("latin-1").split("\\")
        elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            parts = [str(p) for p in value]  # already converted by pydicom
        else:
            parts = [str(value)]
        parts = [p.strip(" \x00") for p in parts]
        return [] if parts == [""] else parts

    def text(self, keyword: str) -> str:
        return "\\".join(self.strings(keyword))

    def float(self, keyword: str, path: Path | None = None) -> float | None:
        """The first value; with `path`, a NaN or infinite one is refused (it would poison the
        geometry or the HU of the whole volume)."""
        values = self.strings(keyword)
        if not values or not values[0]:
            return None
        value = float(values[0])
        if path is not None and not math.isfinite(value):
            raise DicomError(f"{show_path(path)}: {keyword} is {values[0]}")
        return value

    def int(self, keyword: str) -> int | None:
        value = self.float(keyword)
        return None if value is None or not math.isfinite(value) else int(value)

    def floats(self, keyword: str, n: int, path: Path) -> tuple[float, ...] | None:
        values = self.strings(keyword)
        if not values:
            return None
        if len(values) != n:
            raise DicomError(f"{show_path(path)}: {keyword} has {len(values)} values, expected {n}")
        result = tuple(float(x) for x in values)
        if not all(math.isfinite(x) for x in result):
            raise DicomError(f"{show_path(path)}: {keyword} {list(values)} is not finite")
        return result


def _check_orientation(orientation: tuple[float, ...],
                       path: Path) -> tuple[tuple[float, ...], float]:
    """Row and column direction cosines, normalised to unit length, and how far off they were.

    They must be unit vectors at right angles within `ORIENTATION_TOLERANCE`; used unnormalised,
    cosines of length 1.009 would scale every voxel (and the slice step) by that factor.
    """
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    with np.errstate(over="ignore", invalid="ignore"):  # 1e308 cosines overflow: refused below
        lengths = np.array([np.linalg.norm(row), np.linalg.norm(col)])
        off = np.max(np.abs([lengths[0] - 1, lengths[1] - 1, row @ col]))
    if not off <= ORIENTATION_TOLERANCE:  # written so that NaN is refused too
        raise DicomError(f"{show_path(path)}: ImageOrientationPatient {list(orientation)} is not two "
                         "orthogonal unit vectors")
    unit = np.concatenate([row / lengths[0], col / lengths[1]])
    return tuple(float(x) for x in unit), float(np.max(np.abs(lengths - 1)))


def _text(value: bytes) -> str:
    return value.decode("latin-1").strip(" \x00")


def _native_pixel_offset(path: Path, raw: RawHeader, fp, size: int, nbytes: int) -> int | None:
    """Offset of uncompressed little-endian pixel bytes, checking the file holds all of them."""
    if raw.syntax not in _NATIVE_SYNTAXES or not raw.little:
        return None  # compressed, deflated or big endian: pydicom decodes
    fp.seek(raw.pixel_pos)
    head = fp.read(12)
    if len(head) < 12:
        raise DicomError(f"{show_path(path)}: truncated inside the pixel data header")
    group, elem = struct.unpack("<HH", head[:4])
    if (group << 16 | elem) != _PIXEL_DATA:
        return None  # float pixel data: pydicom decides
    if raw.implicit:
        length, start = struct.unpack("<I", head[4:8])[0], raw.pixel_pos + 8
    else:
        length, start = struct.unpack("<I", head[8:12])[0], raw.pixel_pos + 12
    if length == _UNDEFINED:
        return None  # encapsulated despite the transfer syntax: pydicom handles it
    if length < nbytes or size < start + nbytes:
        raise DicomError(
            f"{show_path(path)}: truncated pixel data ({min(length, size - start)} of {nbytes} bytes)")
    if length > nbytes + 1:  # one pad byte makes an odd length even
        raise DicomError(f"{show_path(path)}: pixel data holds {length} bytes but Rows x Columns x "
                         f"BitsAllocated need {nbytes}; the declared image size is wrong")
    return start
