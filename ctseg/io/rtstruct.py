"""Label maps as DICOM RT Structure Sets that reference the source CT series.

Radiotherapy planning systems read contours, not voxel masks: one closed planar polygon per
connected region and slice, in patient coordinates (LPS, mm). rt-utils, the usual library, last
released in January 2023, pulls in OpenCV and predates pydicom 3, so this module builds the
object with pydicom and traces contours with scikit-image (`find_contours` at the 0.5 level, the
boundary half-way between inside and outside pixel centres, with points on a straight run
dropped: exact, and a fraction of the points). A region's holes are contours of their own, as
most planning systems read them (even-odd rule).

As the standard requires, the structure set carries the source's patient and study identifiers,
so unlike ctseg's other outputs it contains them: it is written only when asked for
(`ctseg predict --format rtstruct`).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid
from skimage import measure

from ctseg import __version__
from ctseg.errors import CTSegError
from ctseg.io.dicom_seg import referenced_series
from ctseg.io.redact import show_path
from ctseg.io.volume import CTVolume
from ctseg.utils import atomic_path

#: Patient and study attributes copied from the source (Type 2: present, possibly empty).
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
           "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber", "StudyID")
_REQUIRED_UIDS = ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID",
                  "FrameOfReferenceUID")
_COLOURS = ([220, 120, 60], [60, 140, 220], [80, 200, 120], [200, 200, 60], [170, 90, 200])
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def slice_contours(mask_yx: np.ndarray) -> list[np.ndarray]:
    """Closed contours (N, 2) of (row, col) pixel coordinates around a 2D binary mask, last point
    not repeated. Padding closes regions that touch the border."""
    mask = np.asarray(mask_yx, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    # trace inside the region's box plus a one-pixel margin, which also closes border regions
    top, left = rows[0] - 1, cols[0] - 1
    padded = np.pad(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8), 1)
    contours = []
    for contour in measure.find_contours(padded, 0.5):
        contour = contour[:-1]  # closed: the last point repeats the first
        step_in, step_out = contour - np.roll(contour, 1, axis=0), np.roll(contour, -1, axis=0) - contour
        turns = np.abs(step_in[:, 0] * step_out[:, 1] - step_in[:, 1] * step_out[:, 0]) > 1e-9
        contour = contour[turns]
        if len(contour) >= 3:
            contours.append(contour + (top, left))
    return contours


def save_rtstruct(labels_zyx: np.ndarray, volume: CTVolume, path: str | Path,
                  names: dict[int, str] | None = None) -> Path:
    """Write `labels_zyx` (uint8, the volume's grid) as an RTSTRUCT, one ROI per label value.

    `volume` must come from a DICOM series (`load_series`): its files, in slice order, are the
    referenced CT images. `names` labels the ROIs (default: 1 is "Lung").
    """
    path = Path(path)
    labels, sources = referenced_series(labels_zyx, volume, path, "an RTSTRUCT")
    for source, file in zip(sources, volume.files):
        missing = [k for k in _REQUIRED_UIDS if not str(source.get(k, "") or "").strip()]
        if missing:
            raise CTSegError(f"{show_path(file)}: no {', '.join(missing)}; an RTSTRUCT must "
                             "reference each CT image by its UIDs")
    names = names or {1: "Lung"}
    values = [int(v) for v in np.unique(labels) if v != 0] or sorted(names)
    ds = _header(sources[0], path)
    ds.ReferencedFrameOfReferenceSequence = Sequence([_frame_of_reference(sources)])
    lps = _LPS_FROM_RAS @ np.asarray(volume.affine, dtype=np.float64)
    rois, contours, observations = [], [], []
    for number, value in enumerate(values, start=1):
        name = names.get(value, f"label {value}")
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = sources[0].FrameOfReferenceUID
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        item = Dataset()
        item.ROIDisplayColor = _COLOURS[(number - 1) % len(_COLOURS)]
        item.ReferencedROINumber = number
        item.ContourSequence = Sequence(_roi_contours(labels == value, lps, sources))
        contours.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


def _roi_contours(mask_zyx: np.ndarray, lps: np.ndarray, sources: list[Dataset]) -> list[Dataset]:
    """CLOSED_PLANAR contour items of one label, slice by slice, in LPS millimetres."""
    items = []
    for k in np.flatnonzero(mask_zyx.any(axis=(1, 2))):
        for contour in slice_contours(mask_zyx[k]):
            # voxel (i = column, j = row, k) -> patient LPS
            ijk = np.column_stack([contour[:, 1], contour[:, 0], np.full(len(contour), k), np.ones(len(contour))])
            points = (ijk @ lps.T)[:, :3]
            image = Dataset()
            image.ReferencedSOPClassUID = sources[k].SOPClassUID
            image.ReferencedSOPInstanceUID = sources[k].SOPInstanceUID
            item = Dataset()
            item.ContourImageSequence = Sequence([image])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [f"{v:.3f}".rstrip("0").rstrip(".") for v in points.ravel()]
            items.append(item)
    return items


def _frame_of_reference(sources: list[Dataset]) -> Dataset:
    """The CT series every contour lies on: frame of reference, study, series, each image."""
    images = []
    for source in sources:
        image = Dataset()
        image.ReferencedSOPClassUID = source.SOPClassUID
        image.ReferencedSOPInstanceUID = source.SOPInstanceUID
        images.append(image)
    series = Dataset()
    series.SeriesInstanceUID = sources[0].SeriesInstanceUID
    series.ContourImageSequence = Sequence(images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired): what RT systems expect
    study.ReferencedSOPInstanceUID = sources[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = sources[0].FrameOfReferenceUID
    frame.RTReferencedStudySequence = Sequence([study])
    return frame


def _header(source: Dataset, path: Path) -> Dataset:
    """Patient, study, RT series, equipment, structure set and SOP common modules."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for keyword in _COPIED:
        setattr(ds, keyword, source.get(keyword, ""))
    now = datetime.datetime.now()
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9902
    ds.SeriesDescription = "ctseg contours"
    ds.OperatorsName = ""
    ds.Manufacturer = "ctseg"
    ds.ManufacturerModelName = "ctseg"
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "ctseg"
    ds.StructureSetName = path.name[:64]
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"
    return ds
