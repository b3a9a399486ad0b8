"""DICOM-SEG output: written with highdicom from a real series, read back, compared exactly."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

from ctseg.errors import CTSegError
from ctseg.io import load_image, load_series, save_nifti
from ctseg.io.dicom_seg import save_dicom_seg


@pytest.fixture
def series(write_series):
    rng = np.random.default_rng(29)
    stored = rng.integers(0, 2000, size=(6, 16, 12)).astype(np.int16)
    paths = write_series(stored, orientation=(1, 0, 0, 0, 0.8660254, -0.5), spacing=-2.0)
    return paths, load_series(paths[0].parent)


def _read_back(path, volume) -> np.ndarray:
    seg = hd.seg.segread(path)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in volume.files]
    planes = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               segment_numbers=list(range(1, seg.number_of_segments + 1)))
    values = [int(seg.get_segment_description(n).segment_label.split()[-1])
              if seg.get_segment_description(n).segment_label.startswith("label") else 1
              for n in range(1, seg.number_of_segments + 1)]
    labels = np.zeros(planes.shape[:3], np.uint8)
    for k, value in enumerate(values):
        labels[planes[..., k] > 0] = value
    return labels


def test_binary_mask_round_trips_exactly_and_references_the_series(series, tmp_path):
    paths, volume = series
    labels = (volume.array > -100).astype(np.uint8)
    out = save_dicom_seg(labels, volume, tmp_path / "case.seg.dcm")
    np.testing.assert_array_equal(_read_back(out, volume), labels)
    seg = pydicom.dcmread(out)
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "Lung"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == \
        {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    # the standard requires the patient module: copied from the source, on request only
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID


def test_several_labels_become_segments(series, tmp_path):
    _, volume = series
    labels = np.digitize(volume.array, [-700, 300]).astype(np.uint8)  # 0, 1, 2
    out = save_dicom_seg(labels, volume, tmp_path / "multi.seg.dcm", names={1: "label 1", 2: "label 2"})
    assert pydicom.dcmread(out).SegmentSequence[1].SegmentLabel == "label 2"
    np.testing.assert_array_equal(_read_back(out, volume), labels)


def test_a_volume_not_from_a_dicom_series_is_refused(series, tmp_path):
    _, volume = series
    nifti = load_image(save_nifti(volume.array, volume.affine, tmp_path / "ct.nii.gz"))
    with pytest.raises(CTSegError, match="references a DICOM series"):
        save_dicom_seg(np.zeros(nifti.shape, np.uint8), nifti, tmp_path / "x.seg.dcm")
    assert not (tmp_path / "x.seg.dcm").exists()


def test_predict_writes_a_seg_matching_the_nifti_only_when_asked(tmp_path_factory, phantom_dir,
                                                                 tmp_path):
    import nibabel as nib
    from infer_helpers import tiny_run

    from ctseg.cli import main

    run = tiny_run(tmp_path_factory, phantom_dir)
    case = phantom_dir / "Images" / "Phantom_001"
    plain = tmp_path / "plain"
    assert main(["predict", "--model", str(run), "--input", str(case), "--output", str(plain),
                 "--device", "cpu"]) == 0
    assert not list(plain.glob("*.dcm"))  # identifiers leave only on request
    out = tmp_path / "seg"
    assert main(["predict", "--model", str(run), "--input", str(case), "--output", str(out),
                 "--device", "cpu", "--format", "nifti,dicom-seg"]) == 0
    volume = load_series(case)
    mask = np.asarray(nib.load(out / "Phantom_001.nii.gz").dataobj).transpose(2, 1, 0)
    assert mask.any()
    np.testing.assert_array_equal(_read_back(out / "Phantom_001.seg.dcm", volume), mask)
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(run), "--input", str(case), "--output", str(out),
              "--format", "rtss"])  # not a format (rtstruct is one: tests/test_rtstruct.py)
