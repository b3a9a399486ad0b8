"""DICOM CT series → `CTVolume` in Hounsfield units with geometry you can trust.

Every exported mask inherits this module's slice order and affine, so it refuses anything it
cannot place exactly (gaps, conflicting duplicates, mixed geometry, broken files) instead of
guessing. Headers are read first without pixels (to group series and order slices by position
along the slice normal, never by file name); then only the chosen series' pixel bytes are read
by parallel workers, each rescaling its slice to HU straight into one preallocated volume.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

from ctseg.errors import DicomError
from ctseg.io.dicom_headers import SliceHeader, read_header
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


def load_series(path: str | Path, series_uid: str | None = None) -> CTVolume:
    """Load one CT series from a folder (searched recursively) or a single file.

    Raises `DicomError` naming the offending file(s) for unreadable or truncated files (and
    files named `*.dcm` that are not DICOM), broken symbolic links, several image series without
    `series_uid`, inconsistent geometry or modality, non-finite or implausible header values,
    conflicting duplicate positions and gaps. Non-image objects (RTSTRUCT, SEG, DICOMDIR,
    localizers, non-DICOM files) are skipped with a logged note.
    """
    root = Path(path)
    if not root.exists():
        raise DicomError(f"{root}: no such file or folder")
    files = list_files(root) if root.is_dir() else [root]
    headers = _read_headers(files, root)
    series = _pick_series(headers, root, series_uid)
    ordered, positions, order_key = _order(series, root)
    _check_consistent(ordered, root)
    hu = _read_hu(ordered)
    ordered, hu, positions = _drop_duplicates(ordered, hu, positions, root)
    affine, spacing = _geometry(ordered, positions, order_key, root)
    first = ordered[0]
    if first.modality != "CT":
        log.warning("series %s has modality %s, not CT: values are not Hounsfield units",
                    first.series_uid, first.modality)
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
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def unreadable(exc: OSError) -> None:
        raise DicomError(f"{exc.filename}: cannot list folder ({exc.strerror or exc})") from exc

    for folder, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen_dirs:
            log.info("ignored %s: a symbolic link back to a folder already read", folder)
            dirs.clear()
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        for name in names:  # broken links and link loops are listed here, not as folders
            path = Path(folder, name)
            try:
                stat = path.stat()
            except OSError as exc:
                if not path.is_symlink():
                    raise DicomError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
                kind = "symbolic link loop" if exc.errno == errno.ELOOP else "broken symbolic link"
                raise DicomError(f"{path}: {kind} ({exc.strerror or exc})") from exc
            if not path.is_file() or (stat.st_dev, stat.st_ino) in seen_files:
                continue  # sockets, devices; a file reached twice through links is read once
            seen_files.add((stat.st_dev, stat.st_ino))
            files.append(path)
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
        log.info("ignored %d of %d files under %s", skipped, len(files), root.name or root)
    return headers


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) if root.is_dir() else path.name
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- series, order

def _pick_series(headers: list[SliceHeader], root: Path, series_uid: str | None) -> list[SliceHeader]:
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for h in headers:
        groups[h.series_uid].append(h)
    if not groups:
        raise DicomError(f"{root}: no DICOM image series found")
    listing = "; ".join(f"{uid} ({g[0].modality or '?'}, {len(g)} images)"
                        for uid, g in sorted(groups.items()))
    if series_uid is not None:
        if series_uid not in groups:
            raise DicomError(f"{root}: no series {series_uid}; found: {listing}")
        return groups[series_uid]
    if len(groups) > 1:
        raise DicomError(f"{root}: {len(groups)} image series found, choose one with "
                         f"--series / series_uid: {listing}")
    return next(iter(groups.values()))


def _normal(h: SliceHeader) -> np.ndarray:
    o = np.asarray(h.orientation or _AXIAL, dtype=np.float64)
    return np.cross(o[:3], o[3:])


def _order(series: list[SliceHeader], root: Path) -> tuple[list[SliceHeader], np.ndarray, str]:
    """Slices sorted by position along the slice normal (ascending) and those positions."""
    if any(h.orientation is None for h in series):
        log.warning("%s: ImageOrientationPatient missing, assuming axial slices", root.name)
    if all(h.position is not None for h in series):
        normal = _normal(series[0])
        keys = np.array([np.dot(h.position, normal) for h in series])
        order_key = "ImagePositionPatient"
    elif all(h.slice_location is not None for h in series):
        keys = np.array([h.slice_location for h in series])
        order_key = "SliceLocation"
        log.warning("%s: ImagePositionPatient missing, ordering by SliceLocation", root.name)
    elif all(h.instance_number is not None for h in series):
        keys = np.array([h.instance_number for h in series], dtype=np.float64)
        order_key = "InstanceNumber"
        log.warning("%s: no slice positions, ordering by InstanceNumber; slice spacing comes "
                    "from the header and cannot be checked", root.name)
    else:
        raise DicomError(f"{root}: slices carry neither ImagePositionPatient, SliceLocation "
                         "nor InstanceNumber; their order cannot be established")
    index = np.argsort(keys, kind="stable")
    return [series[i] for i in index], keys[index], order_key


def _check_consistent(slices: list[SliceHeader], root: Path) -> None:
    ref = slices[0]
    for h in slices[1:]:
        if h.modality != ref.modality:
            raise DicomError(f"mixed modalities in series {ref.series_uid}: {ref.path} is "
                             f"{ref.modality or '?'} but {h.path} is {h.modality or '?'}")
        if (h.rows, h.cols) != (ref.rows, ref.cols):
            raise DicomError(f"inconsistent Rows/Columns: {ref.path} is {ref.rows}x{ref.cols} but "
                             f"{h.path} is {h.rows}x{h.cols}")
        if not _close(h.pixel_spacing, ref.pixel_spacing):
            raise DicomError(f"inconsistent PixelSpacing: {ref.path} has {ref.pixel_spacing} but "
                             f"{h.path} has {h.pixel_spacing}")
        if not _close(h.orientation, ref.orientation):
            raise DicomError(f"inconsistent ImageOrientationPatient: {ref.path} has "
                             f"{ref.orientation} but {h.path} has {h.orientation}")
    if ref.pixel_spacing is None:
        raise DicomError(f"{ref.path}: PixelSpacing missing; the voxel size is unknown")


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
    """Refuse, before allocating, a volume larger than this machine's memory."""
    needed = n * ref.rows * ref.cols * 4
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): let numpy decide
        return
    if needed > total:
        raise DicomError(f"{ref.path}: the series ({n} slices of {ref.rows}x{ref.cols}) would "
                         f"need {needed / 2**30:.1f} GiB, more than this machine's "
                         f"{total / 2**30:.1f} GiB of memory")


def _check_values(stored: np.ndarray, h: SliceHeader) -> None:
    """Rescaled values must be finite float32, and for CT within `HU_RANGE`.

    Checked on the stored values (the rescale is linear), while the slice is still in cache.
    """
    ends = h.slope * np.array([stored.min(), stored.max()], dtype=np.float64) + h.intercept
    lo, hi = float(ends.min()), float(ends.max())
    low, high = HU_RANGE if h.modality == "CT" else (-_FLOAT32_MAX, _FLOAT32_MAX)
    if not (low <= lo and hi <= high):  # also False for NaN (float pixel data)
        raise DicomError(f"{h.path}: values {lo:.6g}..{hi:.6g} after RescaleSlope {h.slope:g} "
                         f"and RescaleIntercept {h.intercept:g} are not plausible "
                         f"{'HU' if h.modality == 'CT' else 'values'}")


def _read_stored(h: SliceHeader, buffers: threading.local) -> np.ndarray:
    if h.pixel_offset is None:
        return _decode(h)
    buffer = getattr(buffers, "buffer", None)
    if buffer is None or buffer.shape != (h.rows, h.cols) or buffer.dtype != h.dtype:
        buffer = buffers.buffer = np.empty((h.rows, h.cols), dtype=h.dtype)
    with open(h.path, "rb") as fp:
        fp.seek(h.pixel_offset)
        if fp.readinto(memoryview(buffer).cast("B")) != buffer.nbytes:
            raise DicomError(f"{h.path}: truncated pixel data")
    return buffer


def _decode(h: SliceHeader) -> np.ndarray:
    try:
        stored = pydicom.dcmread(h.path, force=True).pixel_array
    except Exception as exc:  # decoders raise many types; all mean "cannot decode this file"
        raise DicomError(f"{h.path}: cannot decode pixel data ({exc})") from exc
    if stored.shape != (h.rows, h.cols):
        raise DicomError(f"{h.path}: decoded pixels have shape {stored.shape}, header says "
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
                             f"pixels: {slices[kept].path} and {slices[i].path}")
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
        log.warning("%s: in-plane origin unknown without ImagePositionPatient", root.name)
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
            f"{slices[worst].path} and {slices[worst + 1].path}, {step:.3f} mm on average")
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
                    "are shifted", root.name, tilt)
