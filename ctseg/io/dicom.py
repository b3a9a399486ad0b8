"""DICOM CT series → `CTVolume` in Hounsfield units with geometry you can trust.

Every exported mask inherits this module's slice order and affine, so it refuses anything it
cannot place exactly (gaps, conflicting duplicates, mixed geometry, broken files) instead of
guessing. Headers are read first without pixels (to group series and order slices by position
along the slice normal, never by file name); then only the chosen series' pixel bytes are read
by parallel workers, each rescaling its slice to HU straight into one preallocated volume.

Series are told apart by SeriesInstanceUID, or, where an anonymiser blanked it, by study and
series description, series and acquisition number and geometry. Without a choice the CT series
with the most slices that forms a valid volume is read (`scan_series` lists them all).
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_module
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom

from ctseg.errors import DicomError
from ctseg.io.dicom_headers import (ORIENTATION_WARN, SliceHeader, file_kind, open_regular,
                                    read_header)
from ctseg.io.memory import check_memory
from ctseg.io.redact import mask_uid, show_path
from ctseg.io.volume import CTVolume

log = logging.getLogger(__name__)

#: Largest allowed deviation of any slice step from the series' mean step, relative to that
#: step. One missing slice doubles a step (100 %); scanner rounding of positions stays < 1 %.
SPACING_TOLERANCE = 0.05
#: Absolute tolerance for "same" PixelSpacing (mm) and orientation cosines between slices.
GEOMETRY_TOLERANCE = 1e-3
#: Two slices closer than this along the normal (mm) occupy the same position.
DUPLICATE_TOLERANCE = 1e-2
#: Sine of the angle between the slice normal and the stacking direction above which the series
#: is reported as gantry-tilted.
TILT_TOLERANCE = 1e-3

#: Plausible range of CT values after rescaling (HU): air is -1000, dense metal on extended CT
#: scales reaches about 31000, and NIfTI images are written as int16. Values outside come from
#: a broken RescaleSlope/Intercept or a wrong PixelRepresentation.
HU_RANGE = (-32768.0, 32767.0)

_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Threads reading and rescaling pixel data; I/O and numpy release the GIL.
_PIXEL_WORKERS = 4
_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class SeriesInfo:
    """One image series found in a folder, as `ctseg series` lists it (no identifiers)."""

    index: int  # 1-based, in the order listed
    headers: list[SliceHeader]
    spacing: tuple[float, float, float] | None  # (z, y, x) mm; None when not a valid volume
    problem: str  # why it is not chosen automatically; "" when it is a candidate

    @property
    def uid(self) -> str:
        return self.headers[0].series_uid

    @property
    def masked_uid(self) -> str:
        return mask_uid(self.uid)

    @property
    def modality(self) -> str:
        return self.headers[0].modality

    @property
    def description(self) -> str:
        return self.headers[0].description

    @property
    def slices(self) -> int:
        return len(self.headers)

    @property
    def usable(self) -> bool:
        return not self.problem

    def summary(self) -> str:
        spacing = "x".join(f"{s:.3g}" for s in self.spacing) if self.spacing else "?"
        return (f"{self.index}: {self.masked_uid} {self.modality or '?'} "
                f"{self.description or '(no description)'!r}, {self.slices} images, spacing "
                f"(z,y,x) {spacing} mm" + (f" [not usable: {self.problem}]" if self.problem else ""))


def load_series(path: str | Path, series: str | int | None = None) -> CTVolume:
    """Load one CT series from a folder (searched recursively) or a single file.

    `series` is a SeriesInstanceUID, its masked form or a 1-based index as `ctseg series`
    lists them; without it a single series is read, or among several the CT series with the
    most slices that forms a valid volume (localizers, derived and non-CT series skipped).
    Raises `DicomError` naming the offending file(s) for unreadable or truncated files (and
    files named `*.dcm` that are not DICOM), broken symbolic links, no or several equally good
    series, inconsistent geometry or modality, non-finite or implausible header values,
    conflicting duplicate positions and gaps. Non-image objects (RTSTRUCT, SEG, DICOMDIR,
    localizers, non-DICOM files) are skipped with a logged note.
    """
    root = Path(path)
    found = scan_series(root)
    chosen = _choose(found, root, series)
    if len(found) > 1:
        log.info("%s: reading series %s", _name(root), chosen.summary())
    if series is None:
        for info in found:  # a broken main series must not go unnoticed behind a smaller one
            if not info.usable and info.modality == "CT" and info.slices > chosen.slices:
                log.warning("%s: not reading the larger series %s", _name(root), info.summary())
    if not chosen.uid:
        log.warning("%s: series identified without a SeriesInstanceUID (blanked by an "
                    "anonymiser?), from its descriptions, acquisition number and geometry",
                    _name(root))
    return assemble(chosen.headers, root, _read_hu)


def assemble(headers: list[SliceHeader], root: Path,
             read_hu: Callable[[list[SliceHeader]], np.ndarray]) -> CTVolume:
    """Order, check and stack slices (files, or frames of a multi-frame file) into a volume.

    `read_hu` returns the HU of the slices it is given, in that order, as (z, y, x) float32.
    """
    ordered, positions, order_key = _order(headers, root)
    _check_consistent(ordered, root)
    error = max(h.orientation_error for h in ordered)
    if error > ORIENTATION_WARN:
        log.warning("%s: ImageOrientationPatient direction cosines are off unit length by up to "
                    "%.2g; normalised", _name(root), error)
    hu = read_hu(ordered)
    ordered, hu, positions = _drop_duplicates(ordered, hu, positions, root)
    affine, spacing = _geometry(ordered, positions, order_key, root)
    first = ordered[0]
    if first.modality != "CT":
        log.warning("series %s has modality %s, not CT: values are not Hounsfield units",
                    mask_uid(first.series_uid), first.modality)
    metadata = {
        "series_uid": first.series_uid,
        "modality": first.modality,
        "manufacturer": first.manufacturer,
        "kernel": first.kernel,
        "order_key": order_key,
    }
    return CTVolume(hu, affine, spacing, [h.path for h in ordered], metadata)


# --------------------------------------------------------------------------- files

def list_files(root: Path) -> list[Path]:
    """Every file under `root`, sorted, following directory links but never around a loop.

    A link whose target is missing (or that points at itself) is refused: it may be a slice
    on an unmounted share, and skipping it would shorten the series without a word.
    """
    files: list[Path] = []
    skipped: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        raise DicomError(f"{show_path(exc.filename)}: cannot list folder "
                         f"({exc.strerror or exc})") from exc

    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            log.info("ignored %s: a symbolic link back to a folder already read", show_path(folder))
            dirs.clear()
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        for name in names:  # broken links and link loops are listed here, not as folders
            path = Path(folder, name)
            try:
                stat = path.stat()
            except OSError as exc:
                if not path.is_symlink():
                    raise DicomError(f"{show_path(path)}: cannot read file "
                                     f"({exc.strerror or exc})") from exc
                kind = "symbolic link loop" if exc.errno == errno.ELOOP else "broken symbolic link"
                raise DicomError(f"{show_path(path)}: {kind} ({exc.strerror or exc})") from exc
            if not stat_module.S_ISREG(stat.st_mode):  # FIFOs would block a read forever
                if not stat_module.S_ISDIR(stat.st_mode):
                    skipped.append(f"{_rel(path, root)} ({file_kind(stat.st_mode)})")
                continue
            if (stat.st_dev, stat.st_ino) in seen_files:
                continue  # a file reached twice through links is read once
            seen_files.add((stat.st_dev, stat.st_ino))
            files.append(path)
    if skipped:
        log.info("ignored %d entries under %s that are not regular files: %s", len(skipped),
                 _name(root), ", ".join(sorted(skipped)))
    return sorted(files)


# --------------------------------------------------------------------------- headers

def _read_headers(files: list[Path], root: Path) -> list[SliceHeader]:
    """Parse all headers (no pixels); log a note per skipped file; raise on broken DICOM."""
    if not files:
        raise DicomError(f"{root}: folder holds no files")
    # Serial on purpose: header scanning is Python code holding the GIL, and a thread pool
    # measured slower (docs/benchmarks.md); the pixel reads, which release it, run in parallel.
    results = [read_header(f) for f in files]
    headers = []
    skipped = 0
    for path, result in zip(files, results):
        if isinstance(result, str):
            skipped += 1
            log.info("ignored %s: %s", _rel(path, root), result)
        else:
            headers.append(result)
    if skipped:
        log.info("ignored %d of %d files under %s", skipped, len(files), _name(root))
    return headers


def _rel(path: Path, root: Path) -> str:
    try:
        return show_path(path.relative_to(root) if root.is_dir() else path.name)
    except ValueError:
        return show_path(path)


def _name(root: Path) -> str:
    return show_path(root.name or root)


# --------------------------------------------------------------------------- series, order

def scan_series(path: str | Path) -> list[SeriesInfo]:
    """Every image series under `path` (headers only), each judged as a volume without pixels."""
    root = Path(path)
    if not root.exists():
        raise DicomError(f"{show_path(root)}: no such file or folder")
    files = list_files(root) if root.is_dir() else [root]
    groups: dict[tuple, list[SliceHeader]] = defaultdict(list)
    for h in _read_headers(files, root):
        groups[h.group_key].append(h)
    if not groups:
        raise DicomError(f"{show_path(root)}: no DICOM image series found")
    ordered = sorted(groups.values(), key=lambda g: (g[0].series_number is None,
                                                     g[0].series_number or 0, str(g[0].path)))
    # Files without a UID that agree on everything but geometry: one series with mixed
    # orientation or size, or several? Neither is read without the user saying which.
    acquisitions: dict[tuple, int] = defaultdict(int)
    for g in ordered:
        acquisitions[g[0].acquisition_key] += 1
    found = []
    for index, group in enumerate(ordered, start=1):
        spacing, problem = _assess(group, root)
        if acquisitions[group[0].acquisition_key] > 1:
            problem = ("files without SeriesInstanceUID share this description and acquisition "
                       "but differ in orientation, size or pixel spacing (mixed geometry?)")
        found.append(SeriesInfo(index, group, spacing, problem))
    return found


def _assess(group: list[SliceHeader], root: Path) -> tuple[tuple[float, float, float] | None, str]:
    """(z, y, x) spacing and, when the series is no candidate for automatic choice, why."""
    try:
        ordered, positions, order_key = _order(group, root, warn=False)
        _check_consistent(ordered, root)
        distinct = np.concatenate([[True], np.abs(np.diff(positions)) >= DUPLICATE_TOLERANCE])
        dz = _slice_spacing([h for h, d in zip(ordered, distinct) if d], positions[distinct],
                            order_key, root)
    except DicomError as exc:
        return None, str(exc)
    spacing = (dz, *ordered[0].pixel_spacing)
    if group[0].modality != "CT":
        return spacing, f"modality {group[0].modality or '?'}, not CT"
    if any(h.derived for h in group):
        return spacing, "derived or secondary images (ImageType)"
    return spacing, ""


def _choose(found: list[SeriesInfo], root: Path, series: str | int | None) -> SeriesInfo:
    listing = "; ".join(info.summary() for info in found)
    if series is not None:
        text = str(series).strip()
        for info in found:
            if text in (str(info.index), info.uid, info.masked_uid):
                return info
        raise DicomError(f"{show_path(root)}: no series {mask_uid(text) if '.' in text else text!r}"
                         f"; found: {listing}")
    if len(found) == 1:
        return found[0]
    candidates = [info for info in found if info.usable]
    if not candidates:
        raise DicomError(f"{show_path(root)}: {len(found)} image series found, none a valid CT "
                         f"volume; choose one with --series: {listing}")
    most = max(info.slices for info in candidates)
    best = [info for info in candidates if info.slices == most]
    if len(best) > 1:
        raise DicomError(f"{show_path(root)}: {len(found)} image series found, "
                         f"{len(best)} CT series with {most} slices; choose one with --series "
                         f"(index or UID): {listing}")
    return best[0]


def _normal(h: SliceHeader) -> np.ndarray:
    o = np.asarray(h.orientation or _AXIAL, dtype=np.float64)
    return np.cross(o[:3], o[3:])


def _order(series: list[SliceHeader], root: Path,
           warn: bool = True) -> tuple[list[SliceHeader], np.ndarray, str]:
    """Slices sorted by position along the slice normal (ascending) and those positions.

    `warn=False` for a trial ordering (`scan_series`): the warnings come when a series is read.
    """
    note = log.warning if warn else (lambda *args: None)
    if any(h.orientation is None for h in series):
        note("%s: ImageOrientationPatient missing, assuming axial slices", _name(root))
    if all(h.position is not None for h in series):
        normal = _normal(series[0])
        keys = np.array([np.dot(h.position, normal) for h in series])
        order_key = "ImagePositionPatient"
    elif all(h.slice_location is not None for h in series):
        keys = np.array([h.slice_location for h in series])
        order_key = "SliceLocation"
        note("%s: ImagePositionPatient missing, ordering by SliceLocation", _name(root))
    elif all(h.instance_number is not None for h in series):
        keys = np.array([h.instance_number for h in series], dtype=np.float64)
        order_key = "InstanceNumber"
        note("%s: no slice positions, ordering by InstanceNumber; slice spacing comes "
             "from the header and cannot be checked", _name(root))
    else:
        raise DicomError(f"{show_path(root)}: slices carry neither ImagePositionPatient, "
                         "SliceLocation nor InstanceNumber; their order cannot be established")
    index = np.argsort(keys, kind="stable")
    return [series[i] for i in index], keys[index], order_key


def _check_consistent(slices: list[SliceHeader], root: Path) -> None:
    ref = slices[0]
    for h in slices[1:]:
        if h.modality != ref.modality:
            raise DicomError(f"mixed modalities in series {mask_uid(ref.series_uid)}: {show_path(ref.path)} is "
                             f"{ref.modality or '?'} but {show_path(h.path)} is {h.modality or '?'}")
        if (h.rows, h.cols) != (ref.rows, ref.cols):
            raise DicomError(f"inconsistent Rows/Columns: {show_path(ref.path)} is {ref.rows}x{ref.cols} but "
                             f"{show_path(h.path)} is {h.rows}x{h.cols}")
        if not _close(h.pixel_spacing, ref.pixel_spacing):
            raise DicomError(f"inconsistent PixelSpacing: {show_path(ref.path)} has {ref.pixel_spacing} but "
                             f"{show_path(h.path)} has {h.pixel_spacing}")
        if not _close(h.orientation, ref.orientation):
            raise DicomError(f"inconsistent ImageOrientationPatient: {show_path(ref.path)} has "
                             f"{ref.orientation} but {show_path(h.path)} has {h.orientation}")
    if ref.pixel_spacing is None:
        raise DicomError(f"{show_path(ref.path)}: PixelSpacing missing; the voxel size is unknown")


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b, rtol=0, atol=GEOMETRY_TOLERANCE))


# --------------------------------------------------------------------------- pixels

def _read_hu(slices: list[SliceHeader]) -> np.ndarray:
    """All slices in HU as one (z, y, x) float32 array, read and rescaled in parallel.

    Each worker reads a slice's stored values (native bytes straight off disk with `readinto`,
    compressed ones through pydicom's pylibjpeg/openjpeg/RLE plugins) and writes
    `stored * slope + intercept` into that slice's row of the output; file reads and numpy
    release the GIL, so the slices overlap and the output is filled exactly once.
    """
    ref = slices[0]
    _check_memory(len(slices), ref)
    out = np.empty((len(slices), ref.rows, ref.cols), dtype=np.float32)
    buffers = threading.local()

    def fill(i: int) -> None:
        h = slices[i]
        stored = _read_stored(h, buffers)
        _fix_unused_bits(stored, h)
        _check_values(stored, h)
        if h.slope == 1:
            np.add(stored, np.float32(h.intercept), out=out[i], dtype=np.float32)
        else:
            np.multiply(stored, np.float32(h.slope), out=out[i], dtype=np.float32)
            out[i] += np.float32(h.intercept)

    with ThreadPoolExecutor(min(_PIXEL_WORKERS, len(slices))) as pool:
        list(pool.map(fill, range(len(slices))))
    return out


def _check_memory(n: int, ref: SliceHeader) -> None:
    """Refuse, before decoding anything, a series larger than the memory available now.

    Counted: the float32 volume, and per pixel worker its decode copies (a compressed file is
    decoded by pydicom whole: the inflated dataset, the decoded array and its writeable copy).
    """
    per_file = ref.rows * ref.cols * ref.bits_allocated // 8
    workers = min(_PIXEL_WORKERS, n)
    needed = n * ref.rows * ref.cols * 4 + workers * per_file * (3 if ref.decoded else 1)
    check_memory(needed, f"the series ({n} slices of {ref.rows}x{ref.cols})",
                 show_path(ref.path), DicomError)


def _check_values(stored: np.ndarray, h: SliceHeader) -> None:
    """Rescaled values must be finite float32, and for CT within `HU_RANGE`.

    Checked on the stored values (the rescale is linear), while the slice is still in cache.
    """
    ends = h.slope * np.array([stored.min(), stored.max()], dtype=np.float64) + h.intercept
    lo, hi = float(ends.min()), float(ends.max())
    low, high = HU_RANGE if h.modality == "CT" else (-_FLOAT32_MAX, _FLOAT32_MAX)
    if not (low <= lo and hi <= high):  # also False for NaN (float pixel data)
        raise DicomError(f"{show_path(h.path)}: values {lo:.6g}..{hi:.6g} after RescaleSlope {h.slope:g} "
                         f"and RescaleIntercept {h.intercept:g} are not plausible "
                         f"{'HU' if h.modality == 'CT' else 'values'}")


def _read_stored(h: SliceHeader, buffers: threading.local) -> np.ndarray:
    if h.pixel_offset is None:
        return _decode(h)
    buffer = getattr(buffers, "buffer", None)
    if buffer is None or buffer.shape != (h.rows, h.cols) or buffer.dtype != h.dtype:
        buffer = buffers.buffer = np.empty((h.rows, h.cols), dtype=h.dtype)
    with open_regular(h.path) as fp:
        fp.seek(h.pixel_offset)
        if fp.readinto(memoryview(buffer).cast("B")) != buffer.nbytes:
            raise DicomError(f"{show_path(h.path)}: truncated pixel data")
    return buffer


def _decode(h: SliceHeader) -> np.ndarray:
    try:
        with open_regular(h.path) as fp:
            stored = pydicom.dcmread(fp, force=True).pixel_array
    except DicomError:
        raise
    except Exception as exc:  # decoders raise many types; all mean "cannot decode this file"
        raise DicomError(f"{show_path(h.path)}: cannot decode pixel data ({exc})") from exc
    if stored.shape != (h.rows, h.cols):
        raise DicomError(f"{show_path(h.path)}: decoded pixels have shape {stored.shape}, header says "
                         f"{h.rows}x{h.cols}")
    return stored if stored.flags.writeable else stored.copy()


def _fix_unused_bits(stored: np.ndarray, h: SliceHeader) -> None:
    """Clear (unsigned) or sign-extend (signed) the bits above BitsStored, as the standard says."""
    if h.bits_stored >= h.bits_allocated:
        return
    if h.signed:
        shift = stored.dtype.itemsize * 8 - h.bits_stored
        stored <<= shift
        stored >>= shift
    else:
        stored &= (1 << h.bits_stored) - 1


def _drop_duplicates(slices, hu, positions, root):
    """Drop slices repeating a position with identical HU; refuse conflicting ones."""
    if len(slices) < 2:
        return slices, hu, positions
    repeats = np.flatnonzero(np.abs(np.diff(positions)) < DUPLICATE_TOLERANCE) + 1
    if repeats.size == 0:
        return slices, hu, positions
    drop: list[int] = []
    for i in repeats:
        kept = i - 1
        while kept in drop:
            kept -= 1
        if not np.array_equal(hu[kept], hu[i]):
            raise DicomError(f"duplicate slice position {positions[i]:.3f} mm with different "
                             f"pixels: {show_path(slices[kept].path)} and {show_path(slices[i].path)}")
        log.info("dropped %s: identical duplicate of %s", _rel(slices[i].path, root),
                 _rel(slices[kept].path, root))
        drop.append(int(i))
    keep = np.setdiff1d(np.arange(len(slices)), drop)
    return [slices[i] for i in keep], hu[keep], positions[keep]


# --------------------------------------------------------------------------- geometry

def _geometry(slices: list[SliceHeader], positions: np.ndarray, order_key: str,
              root: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """RAS affine for (x, y, z) voxel indices and (z, y, x) spacing, as SimpleITK sees it."""
    ref = slices[0]
    o = np.asarray(ref.orientation or _AXIAL, dtype=np.float64)
    row_dir, col_dir = o[:3], o[3:]
    normal = np.cross(row_dir, col_dir)
    dy, dx = ref.pixel_spacing  # PixelSpacing is (between rows, between columns)
    dz = _slice_spacing(slices, positions, order_key, root)
    if order_key == "ImagePositionPatient":
        origin = np.asarray(ref.position, dtype=np.float64)
        _warn_tilt(slices, normal, root)
    elif order_key == "SliceLocation":
        origin = normal * positions[0]
        log.warning("%s: in-plane origin unknown without ImagePositionPatient", _name(root))
    else:
        origin = np.zeros(3)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dx
    lps[:3, 1] = col_dir * dy
    lps[:3, 2] = normal * dz
    lps[:3, 3] = origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return ras, (float(dz), float(dy), float(dx))


def _slice_spacing(slices, positions, order_key, root) -> float:
    """Spacing from positions (not SliceThickness); refuse gaps and uneven steps."""
    ref = slices[0]
    if len(slices) == 1 or order_key == "InstanceNumber":
        return float(ref.spacing_between_slices or ref.slice_thickness or 1.0)
    steps = np.diff(positions)
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    deviation = np.abs(steps - step)
    worst = int(np.argmax(deviation))
    if deviation[worst] > SPACING_TOLERANCE * step:
        raise DicomError(
            f"uneven slice spacing (gap or missing slices): {steps[worst]:.3f} mm between "
            f"{show_path(slices[worst].path)} and {show_path(slices[worst + 1].path)}, {step:.3f} mm on average")
    return float(step)


def _warn_tilt(slices: list[SliceHeader], normal: np.ndarray, root: Path) -> None:
    tilt = max(abs(h.tilt) for h in slices)
    if len(slices) > 1:
        stack_dir = np.subtract(slices[-1].position, slices[0].position)
        stack_dir /= np.linalg.norm(stack_dir)
        sine = float(np.linalg.norm(np.cross(stack_dir, normal)))
        if sine > TILT_TOLERANCE:
            tilt = max(tilt, float(np.degrees(np.arcsin(min(sine, 1.0)))))
    if tilt > 0:
        log.warning("%s: gantry tilt of %.2f degrees; slices are stacked along their normal "
                    "without resampling (as SimpleITK does), so positions off the first slice "
                    "are shifted", _name(root), tilt)
