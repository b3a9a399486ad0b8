"""Label maps as DICOM Segmentation objects (highdicom) that reference the source CT series.

A DICOM-SEG is what PACS viewers and radiotherapy systems load next to the CT. The standard
requires it to carry the source's patient and study identifiers, so unlike every other ctseg
output it contains them: it is written only when asked for (`ctseg predict --format dicom-seg`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from ctseg import __version__
from ctseg.errors import CTSegError
from ctseg.io.dicom_headers import open_regular
from ctseg.io.redact import show_path
from ctseg.io.volume import CTVolume
from ctseg.utils import atomic_path

_DICOM_ORDERS = ("ImagePositionPatient", "SliceLocation", "InstanceNumber")
#: Type 2 patient and study attributes a SEG copies from its source (present, possibly empty).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyTime", "ReferringPhysicianName", "AccessionNumber", "StudyID")


def referenced_series(labels_zyx: np.ndarray, volume: CTVolume, path: Path,
                      what: str) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """The labels as an array and the headers of the series `what` (a DICOM object written to
    `path`) references: refused unless `volume` came from a DICOM series, one file per slice, on
    the labels' grid."""
    if volume.metadata.get("order_key") not in _DICOM_ORDERS or len(volume.files) != volume.shape[0]:
        raise CTSegError(f"{show_path(path)}: {what} references a DICOM series, one file per "
                         "slice; this image came from another format")
    labels = np.asarray(labels_zyx)
    if labels.shape != volume.shape:
        raise CTSegError(f"{show_path(path)}: labels {labels.shape} do not match the volume "
                         f"{volume.shape}")
    sources = []
    for file in volume.files:
        with open_regular(file) as fp:
            sources.append(pydicom.dcmread(fp, stop_before_pixels=True))
    return labels, sources


def save_dicom_seg(labels_zyx: np.ndarray, volume: CTVolume, path: str | Path,
                   names: dict[int, str] | None = None) -> Path:
    """Write `labels_zyx` (uint8, the volume's grid) as a binary DICOM-SEG, one segment per label.

    `volume` must come from a DICOM series (`load_series`): its files, in slice order, are the
    referenced source images. `names` labels the segments (default: 1 is "Lung").
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path)
    labels, sources = referenced_series(labels_zyx, volume, path, "a DICOM-SEG")
    values = [int(v) for v in np.unique(labels) if v != 0]
    names = names or {1: "Lung"}
    for source in sources:
        for keyword in _TYPE2_COPIED:  # may be empty, not absent; exports often drop them
            source.setdefault(keyword, "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="ctseg", version=__version__, family=codes.DCM.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=names.get(value, f"label {value}"),
        segmented_property_category=codes.SCT.Organ if names.get(value) == "Lung" else codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Lung if names.get(value) == "Lung" else codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for number, value in enumerate(values or [1], start=1)]
    # one binary plane per segment: (slices, rows, cols, segments), slices in source order
    planes = np.stack([labels == value for value in (values or [1])], axis=-1).astype(np.uint8)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=planes,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=9901,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="ctseg",
            manufacturer_model_name="ctseg", software_versions=__version__,
            device_serial_number="none", omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # highdicom's refusals
        raise CTSegError(f"{show_path(path)}: cannot build a DICOM-SEG from this series "
                         f"({exc})") from exc
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return path
