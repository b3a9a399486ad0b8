"""The built-in synthetic thoracic CT phantom: real DICOM series plus lung masks (seed layout).

It is the default training set and the test suite's data, so it is built to exercise what real
exports get wrong (shuffled file names, descending instance numbers, intercept storage,
per-case spacing and position) and to look like a chest CT a lung network must *understand*:
outside air and the trachea are as dark as lung, lungs appear and vanish along z, differ left
from right, sit around a heart and over a liver dome. Everything is vectorised numpy over the
whole volume, so a dataset takes seconds.

Other scanners are one argument away: `pixel_spacing` (mm, e.g. 0.7 or 3; the field of view is
then rows x spacing and may cut the body) and `z_range` (the part of the chest from lung bases
to apex, 0..1, that the slices cover: (0.1, 0.45) is lung bases only). Every case lies on a table
a few mm to 2 cm below its back, with air between. `reconstruction_radius` (a fraction of the
field's width; 0.5 touches the edges) writes a scanner's reconstruction circle: `padding_hu`
(e.g. -2000 or -3024) outside it, and no lung label there. The defaults write today's dataset bit
for bit.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from ctseg.config import config_view
from ctseg.data.cache import default_cache_dir
from ctseg.errors import ConfigError
from ctseg.utils import atomic_path

log = logging.getLogger(__name__)

#: DICOM stores HU + 1024 as int16 with RescaleIntercept -1024, as most CT scanners do.
INTERCEPT = -1024.0


@dataclass(frozen=True)
class PhantomGeometry:
    """Where a phantom case sits in patient space (LPS, mm), as its DICOM headers state."""

    origin: tuple[float, float, float]  # ImagePositionPatient of the lowest slice
    pixel_spacing: float  # square pixels
    slice_spacing: float


def write_phantom_dataset(out_dir: str | Path, n_cases: int = 6, seed: int = 0, rows: int = 256,
                          cols: int = 256, slices: int = 48, patient_name: str | None = None,
                          patient_id: str | None = None, pixel_spacing: float | None = None,
                          z_range: tuple[float, float] = (0.0, 1.0),
                          reconstruction_radius: float | None = None, padding_hu: float = -1000.0) -> Path:
    """Write `n_cases` phantom cases as `Images/Phantom_NNN/*.dcm` + `Segmentations/*_seg.npz`.

    Cases are deterministic in (`seed`, case index, size). Patient name, ID and study date are
    random per case unless given, and never equal the case name, so a leak is detectable. Each
    case folder is replaced as a whole, never mixed with files of an earlier run.
    """
    _check_scanner(pixel_spacing, z_range, reconstruction_radius, padding_hu)
    root = Path(out_dir)
    images, segmentations = root / "Images", root / "Segmentations"
    images.mkdir(parents=True, exist_ok=True)
    segmentations.mkdir(parents=True, exist_ok=True)
    for index in range(n_cases):
        name = f"Phantom_{index:03d}"
        rng = np.random.default_rng([seed, index])
        hu, mask, geometry = phantom_case(rng, rows, cols, slices, pixel_spacing, z_range,
                                          reconstruction_radius, padding_hu)
        identity = _identity(rng, patient_name, patient_id)
        _write_case_series(images / name, hu, geometry, rng, identity, descending=index % 2 == 1,
                           padding_hu=padding_hu if reconstruction_radius is not None else None,
                           uid_seed=f"{seed}.{index}.{rows}.{cols}.{slices}"
                           + _scanner_tag(pixel_spacing, z_range, reconstruction_radius, padding_hu))
        with atomic_path(segmentations / f"{name}_seg.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, masks=mask)
    return root


def ensure_phantom(config: dict) -> Path:
    """The built-in phantom dataset, written once into `<cache>/phantom/<settings>` and reused."""
    cfg = config_view(config)
    p = cfg.phantom
    root = Path(cfg.data.cache_dir or default_cache_dir()) / "phantom"
    z_range = tuple(p.z_range) if p.z_range is not None else (0.0, 1.0)
    tag = _scanner_tag(p.pixel_spacing, z_range, p.reconstruction_radius, p.padding_hu)
    final = root / f"n{p.cases}-s{p.seed}-{p.rows}x{p.cols}x{p.slices}{tag}"
    if (final / ".complete").is_file():
        return final
    log.info("writing the phantom dataset to %s (once; reused by later runs)", final)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    written = Path(write_phantom_dataset(tmp, n_cases=p.cases, seed=p.seed, rows=p.rows,
                                         cols=p.cols, slices=p.slices, pixel_spacing=p.pixel_spacing,
                                         z_range=z_range, reconstruction_radius=p.reconstruction_radius,
                                         padding_hu=p.padding_hu))
    (written / ".complete").write_text("")
    shutil.rmtree(final, ignore_errors=True)
    written.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_scanner(pixel_spacing: float | None, z_range: tuple[float, float],
                   reconstruction_radius: float | None = None, padding_hu: float = -1000.0) -> None:
    if reconstruction_radius is not None and not 0 < reconstruction_radius <= 0.75:
        raise ConfigError(f"phantom reconstruction_radius must be in (0, 0.75] of the field's width "
                          f"(0.5: the circle touches the image edges), got {reconstruction_radius}")
    if not -30000 <= padding_hu <= -1000:  # air or a scanner's padding; int16 storage with the intercept
        raise ConfigError(f"phantom padding_hu must be in [-30000, -1000] HU, got {padding_hu}")
    if not (len(z_range) == 2 and 0.0 <= float(z_range[0]) < float(z_range[1]) <= 1.0):
        raise ConfigError(f"phantom z_range must satisfy 0 <= start < end <= 1, got {tuple(z_range)}")
    if pixel_spacing is not None and not pixel_spacing > 0:
        raise ConfigError(f"phantom pixel_spacing must be > 0 mm, got {pixel_spacing}")


def _scanner_tag(pixel_spacing: float | None, z_range: tuple[float, float],
                 reconstruction_radius: float | None = None, padding_hu: float = -1000.0) -> str:
    """What sets a dataset apart from the default scanner, for folder names and UIDs ("" if none)."""
    tag = f"-p{pixel_spacing:g}" if pixel_spacing is not None else ""
    tag += f"-z{z_range[0]:g}-{z_range[1]:g}" if tuple(z_range) != (0.0, 1.0) else ""
    return tag + (f"-r{reconstruction_radius:g}{padding_hu:g}" if reconstruction_radius is not None else "")


def phantom_case(rng: np.random.Generator, rows: int = 256, cols: int = 256, slices: int = 48,
                 pixel_spacing: float | None = None, z_range: tuple[float, float] = (0.0, 1.0),
                 reconstruction_radius: float | None = None, padding_hu: float = -1000.0,
                 ) -> tuple[np.ndarray, np.ndarray, PhantomGeometry]:
    """One chest CT: HU (z, y, x) float32 with z ascending (feet → head), lung mask uint8, geometry.

    The anatomy (mm) depends on `rng` only; `pixel_spacing` (None: the field of view fits the
    body) and `z_range` (0: below the lung bases, 1: above the apex) choose how it is sampled;
    `reconstruction_radius` (a fraction of the field's width, centred on the image) puts
    `padding_hu` outside the scanner's reconstruction circle and removes the lung label there.
    """
    _check_scanner(pixel_spacing, z_range, reconstruction_radius, padding_hu)
    z0, z1 = (float(v) for v in z_range)
    half_width = rng.uniform(140, 175)  # body half-axes (mm): left-right, anterior-posterior
    half_depth = rng.uniform(95, 125)
    fov = max(rng.uniform(380, 440), 2 * half_width + 60)  # also the table's width
    spacing = round(fov / max(rows, cols), 4) if pixel_spacing is None else float(pixel_spacing)
    slice_spacing = round(rng.uniform(270, 330) * (z1 - z0) / slices, 3)
    origin = (round(-spacing * cols / 2 + rng.uniform(-15, 15), 2),
              round(-spacing * rows / 2 + rng.uniform(-10, 10), 2),
              round(rng.uniform(-400, -100), 2))
    geometry = PhantomGeometry(origin, spacing, slice_spacing)

    # Patient coordinates relative to the body centre: x to the patient's left, y posterior.
    centre_x, centre_y = rng.uniform(-12, 12), rng.uniform(-30, -10)
    x = (origin[0] + spacing * np.arange(cols, dtype=np.float32) - centre_x)[None, None, :]
    y = (origin[1] + spacing * np.arange(rows, dtype=np.float32) - centre_y)[None, :, None]
    t = np.linspace(z0, z1, slices, dtype=np.float32)[:, None, None]  # z0 = lowest slice
    z_mm = (t - z0) / (z1 - z0) * slice_spacing * (slices - 1)

    fat = rng.uniform(8, 22)
    inner_w, inner_d = half_width - fat, half_depth - fat
    body_r = _ellipse(x, y, half_width, half_depth)
    inner_r = _ellipse(x, y, inner_w, inner_d)

    hu = np.full((slices, rows, cols), -1000.0, dtype=np.float32)
    table_top = half_depth + rng.uniform(4, 20)
    table_x = np.abs(x) < 0.45 * fov
    hu[np.broadcast_to((np.abs(y - table_top - 2) < 2) & table_x, hu.shape)] = 250.0
    hu[np.broadcast_to((y > table_top + 4) & (y < table_top + 24) & table_x, hu.shape)] = -650.0
    hu[np.broadcast_to((np.abs(y - table_top - 26) < 2) & table_x, hu.shape)] = 250.0
    hu[np.broadcast_to(body_r < 1, hu.shape)] = rng.uniform(-110, -80)  # subcutaneous fat
    hu[np.broadcast_to(inner_r < 1, hu.shape)] = rng.uniform(35, 50)  # muscle and organs

    # Lungs: each an ellipse whose size follows a dome-to-apex profile along z; the right one
    # (patient right, -x) is larger and its base sits higher, over the liver.
    lungs = np.zeros(hu.shape, dtype=bool)
    base = rng.uniform(0.12, 0.25)
    apex = rng.uniform(0.80, 0.92)
    dome = rng.uniform(0.08, 0.14)
    liver = np.zeros(hu.shape, dtype=bool)
    for side, width_scale, base_shift in ((-1, rng.uniform(1.0, 1.08), rng.uniform(0.03, 0.07)),
                                          (1, rng.uniform(0.9, 0.98), 0.0)):
        cx = side * 0.45 * inner_w + rng.uniform(-4, 4)
        cy = 0.05 * inner_d + rng.uniform(-4, 4)
        ax, ay = 0.40 * inner_w * width_scale, 0.66 * inner_d
        lung_base, lung_apex = base + base_shift, apex - rng.uniform(0, 0.04)
        u = np.clip((t - lung_base) / (lung_apex - lung_base), 0, 1)
        profile = np.sqrt(np.clip(1 - u ** 2, 0, 1)) * (u > 0)
        r_full = _ellipse(x - cx, y - cy, ax, ay)
        diaphragm = lung_base + dome * np.clip(1 - r_full ** 2, 0, 1)  # dome under each lung
        inside = _ellipse(x - cx, y - cy, ax * profile + 1e-3, ay * (0.6 + 0.4 * profile) + 1e-3) < 1
        lungs |= inside & (t > diaphragm) & (r_full < 1)
        if side == -1:
            liver |= (r_full < 1.15) & (t <= diaphragm) & (inner_r < 1)
    hu[liver] = rng.uniform(55, 70)

    # Mediastinum and heart push the lungs apart; the heart leans to the patient's left.
    mediastinum = _ellipse(x, y - 0.1 * inner_d, 0.2 * inner_w, 0.8 * inner_d) < 1
    heart_t = np.clip(1 - ((t - (base + 0.25)) / 0.22) ** 2, 0, 1)
    heart = _ellipse(x - 0.14 * inner_w, y + 0.28 * inner_d, 0.32 * inner_w * np.sqrt(heart_t) + 1e-3,
                     0.38 * inner_d * np.sqrt(heart_t) + 1e-3) < 1
    spine = _spine(x, y, z_mm, inner_d, rng)
    lungs &= ~(mediastinum | heart | np.broadcast_to(spine[0][0], lungs.shape))
    hu[heart] = rng.uniform(35, 50)

    # Lung parenchyma: darker anteriorly (gravity), with vessels that belong to the lung.
    lung_hu = rng.uniform(-880, -820) + 40 * np.clip(y / inner_d, -1, 1)
    hu[lungs] = np.broadcast_to(lung_hu, hu.shape)[lungs]
    vessels = _vessels(rng, lungs.shape, lungs, spacing)
    hu[vessels & lungs] = rng.uniform(20, 60)

    # Airways (dark, but not lung), aorta, spine and ribs.
    trachea_top = np.clip((t - (apex - 0.35)) / 0.1, 0, 1) > 0
    trachea_r = _ellipse(x, y + 0.25 * inner_d, 9.0, 8.0)
    hu[np.broadcast_to(trachea_r < 1.35, hu.shape) & trachea_top] = 40.0
    hu[np.broadcast_to(trachea_r < 1, hu.shape) & trachea_top] = -1000.0
    aorta = _ellipse(x - 0.12 * inner_w, y - 0.35 * inner_d, 12.0, 12.0) < 1
    hu[np.broadcast_to(aorta, hu.shape) & (t > base) & ~lungs] = rng.uniform(40, 220)
    for region, value in spine:
        hu[np.broadcast_to(region, hu.shape)] = value
    ribs = _ribs(rng, x, y, t, inner_w, inner_d) & ~lungs & (t > base - 0.1)
    hu[ribs] = rng.uniform(650, 850)

    # Partial volume (in-plane blur) and scanner noise.
    blur = 1.1 / spacing  # about 1.1 mm, whatever the pixel size
    hu = ndimage.gaussian_filter(hu, sigma=(0, blur, blur), truncate=2.5)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(rng.uniform(10, 25))
    if reconstruction_radius is not None:  # the scanner writes an exact padding value, no noise
        yy, xx = np.ogrid[:rows, :cols]
        radius = reconstruction_radius * min(rows, cols)  # pixels
        outside = (yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2 > radius ** 2
        hu[:, outside] = padding_hu
        lungs[:, outside] = False
    return hu, lungs.astype(np.uint8), geometry


def _ellipse(dx, dy, ax, ay):
    """Normalised elliptical radius: < 1 inside the ellipse with half-axes (ax, ay)."""
    return np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)


def _vessels(rng, shape, lungs, spacing) -> np.ndarray:
    """Tubes running roughly along z inside the lungs, thicker near the hilum."""
    slices, rows, cols = shape
    out = np.zeros(shape, dtype=bool)
    for z in range(slices):
        ys, xs = np.nonzero(lungs[z])
        if ys.size == 0:
            continue
        n = int(rng.poisson(ys.size * spacing ** 2 / 2400))  # about one per 24 cm^2 of lung
        pick = rng.integers(0, ys.size, n)
        for cy, cx in zip(ys[pick], xs[pick]):
            radius = rng.uniform(1.0, 3.5) / spacing + 0.5
            r = int(np.ceil(radius))
            y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, rows), max(cx - r, 0), min(cx + r + 1, cols)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            out[z, y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    # Connect dots into short tubes along z, like vessels crossing slices.
    return ndimage.binary_dilation(out, structure=np.ones((3, 1, 1), bool)) if slices > 2 else out


def _spine(x, y, z_mm, inner_d, rng) -> list[tuple[np.ndarray, float]]:
    """Vertebra as (region, HU) layers to paint in order; the first region is the whole spine.

    Placed from the back of the body forwards so the spinous process stays inside the body.
    """
    radius = rng.uniform(14, 20)
    canal_y = inner_d - 30
    cy = canal_y - 8 - radius * 0.85
    body = _ellipse(x, y - cy, radius, radius * 0.85)
    arch = _ellipse(x, y - canal_y, 13, 11)
    spinous = _ellipse(x, y - canal_y - 18, 4, 10)
    disc = (z_mm % rng.uniform(24, 30)) < 5
    whole = (body < 1) | (arch < 1) | (spinous < 1)
    return [
        (whole, 600.0),
        (body < 1, rng.uniform(180, 260)),  # cancellous bone
        ((body >= 0.8) & (body < 1), 700.0),  # cortex
        ((body < 1) & disc, 80.0),  # intervertebral discs
        (arch < 0.6, 15.0),  # spinal canal
    ]


def _ribs(rng, x, y, t, inner_w, inner_d) -> np.ndarray:
    """Oval rib cross-sections spaced around the chest wall, drifting with z (ribs run obliquely)."""
    r = _ellipse(x, y, inner_w, inner_d)
    angle = np.arctan2(y / inner_d, x / inner_w)
    count = int(rng.integers(10, 14))
    phase = 2 * np.pi * (t * rng.uniform(2.5, 4.0) + rng.uniform(0, 1))
    wave = np.cos(count * angle + phase)
    front = np.abs(np.sin(angle) + 1) < 0.08  # no ribs over the sternum (anterior midline)
    return (np.abs(r - 0.91) < 0.04) & (wave > 0.55) & ~front


def _identity(rng, patient_name: str | None, patient_id: str | None) -> dict:
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    name = "".join(rng.choice(letters, 7)) + "^" + "".join(rng.choice(letters, 5))
    pid = "".join(str(d) for d in rng.integers(0, 10, 9))
    date = datetime.date(1995, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 10000)))
    return {"PatientName": patient_name if patient_name is not None else name,
            "PatientID": patient_id if patient_id is not None else pid,
            "StudyDate": date.strftime("%Y%m%d")}


def _write_case_series(folder: Path, hu: np.ndarray, geometry: PhantomGeometry,
                       rng: np.random.Generator, identity: dict, descending: bool,
                       uid_seed: str, padding_hu: float | None = None) -> None:
    """One CT Image Storage file per slice, with shuffled names, into a freshly replaced folder.

    HU are clipped to what the intercept stores, [-1024, 3071], but for pixels holding exactly a
    scanner's `padding_hu`, which it stores below -1024."""
    slices, rows, cols = hu.shape
    clipped = np.clip(np.rint(hu), INTERCEPT, 3071)
    if padding_hu is not None:
        clipped[hu == padding_hu] = padding_hu
    stored = (clipped - INTERCEPT).astype(np.int16)
    study_uid = generate_uid(entropy_srcs=["ctseg-phantom-study", uid_seed])
    series_uid = generate_uid(entropy_srcs=["ctseg-phantom-series", uid_seed])
    frame_uid = generate_uid(entropy_srcs=["ctseg-phantom-frame", uid_seed])
    names = rng.permutation(slices) if not descending else np.arange(slices)[::-1]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for k in range(slices):
            instance = slices - k if descending else k + 1
            sop_uid = generate_uid(entropy_srcs=["ctseg-phantom-slice", uid_seed, str(k)])
            z = geometry.origin[2] + k * geometry.slice_spacing
            ds = _slice_dataset(stored[k], geometry, z, instance, sop_uid, study_uid, series_uid,
                                frame_uid, identity)
            ds.save_as(tmp / f"IM{names[k] + 1:04d}.dcm", enforce_file_format=True)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _ds(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _slice_dataset(pixels: np.ndarray, geometry: PhantomGeometry, z: float, instance: int,
                   sop_uid: str, study_uid: str, series_uid: str, frame_uid: str,
                   identity: dict) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = identity["StudyDate"]
    ds.StudyTime = ds.SeriesTime = "101500"
    ds.Modality = "CT"
    ds.Manufacturer = "ctseg"
    ds.ManufacturerModelName = "synthetic phantom"
    ds.PatientName = identity["PatientName"]
    ds.PatientID = identity["PatientID"]
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(geometry.slice_spacing)
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [_ds(geometry.origin[0]), _ds(geometry.origin[1]), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_uid
    ds.SliceLocation = _ds(z)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(geometry.pixel_spacing)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = _ds(INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds
