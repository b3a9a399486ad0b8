"""RTSTRUCT output: contours re-read with pydicom and rasterised back match the mask, referencing
the right CT images; refused for images that are not a DICOM series."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import RTStructureSetStorage
from skimage.draw import polygon

from ctseg.errors import CTSegError
from ctseg.infer.lungs import split_lungs
from ctseg.io import load_image, load_mask, load_series, save_nifti
from ctseg.io.rtstruct import save_rtstruct, slice_contours


def rasterise(roi_contours, affine: np.ndarray, shape: tuple[int, int, int],
              slice_of_uid: dict[str, int]) -> np.ndarray:
    """The ROI's contours back onto the CT grid (even-odd rule: a contour inside another is a hole)."""
    ras_to_voxel = np.linalg.inv(affine)
    mask = np.zeros(shape, dtype=bool)
    for item in roi_contours.ContourSequence:
        assert item.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(item.ContourData, dtype=np.float64).reshape(-1, 3)
        assert len(points) == item.NumberOfContourPoints
        ras = np.column_stack([-points[:, 0], -points[:, 1], points[:, 2], np.ones(len(points))])
        ijk = (ras @ ras_to_voxel.T)[:, :3]
        k = slice_of_uid[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(ijk[:, 2], k, atol=1e-3)  # the contour lies on its image's plane
        plane = np.zeros(shape[1:], dtype=bool)
        rr, cc = polygon(ijk[:, 1], ijk[:, 0], shape[1:])
        plane[rr, cc] = True
        mask[k] ^= plane
    return mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def written(phantom_dir, tmp_path_factory):
    volume = load_series(phantom_dir / "Images" / "Phantom_001")
    mask = load_mask(phantom_dir / "Segmentations" / "Phantom_001_seg.npz", volume)
    labels = split_lungs(mask, volume.affine, volume.array)
    out = tmp_path_factory.mktemp("rtstruct")
    save_nifti(labels, volume.affine, out / "Phantom_001.nii.gz", kind="label")
    path = save_rtstruct(labels, volume, out / "Phantom_001.rtstruct.dcm",
                         names={1: "Right lung", 2: "Left lung"})
    return volume, out, path


def test_rtstruct_rasterised_back_matches_the_nifti_mask(written) -> None:
    volume, out, path = written
    nifti = nib.load(out / "Phantom_001.nii.gz")
    labels = np.asarray(nifti.dataobj).transpose(2, 1, 0)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    slice_of_uid = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k
                    for k, f in enumerate(volume.files)}
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    assert names == {1: "Right lung", 2: "Left lung"}
    for roi in ds.ROIContourSequence:
        value = int(roi.ReferencedROINumber)
        back = rasterise(roi, nifti.affine, labels.shape, slice_of_uid)
        assert dice(back, labels == value) >= 0.99


def test_rtstruct_references_the_source_series_and_copies_the_patient(written) -> None:
    volume, _, path = written
    ds = pydicom.dcmread(path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.files]
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == sources[0].StudyInstanceUID == ds.StudyInstanceUID
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == [s.SOPInstanceUID for s in sources]
    assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    # the standard requires the patient module: copied, as the docs say
    assert (ds.PatientID, str(ds.PatientName)) == (sources[0].PatientID, str(sources[0].PatientName))
    for roi in ds.ROIContourSequence:
        for item in roi.ContourSequence:
            (image,) = item.ContourImageSequence
            assert image.ReferencedSOPClassUID == sources[0].SOPClassUID


def test_contours_of_a_ring_give_its_hole_back() -> None:
    ring = np.zeros((12, 12), dtype=bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    contours = slice_contours(ring)
    assert len(contours) == 2
    back = np.zeros_like(ring)
    for contour in contours:
        plane = np.zeros_like(ring)
        rr, cc = polygon(contour[:, 0], contour[:, 1], ring.shape)
        plane[rr, cc] = True
        back ^= plane
    np.testing.assert_array_equal(back, ring)


def test_rtstruct_is_refused_for_an_image_that_is_not_a_dicom_series(written, tmp_path) -> None:
    volume, out, _ = written
    nifti_volume = load_image(out / "Phantom_001.nii.gz")
    with pytest.raises(CTSegError, match="references a DICOM series"):
        save_rtstruct(np.zeros(nifti_volume.shape, np.uint8), nifti_volume, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


def test_rtstruct_is_refused_when_the_series_has_no_uids_to_reference(phantom_dir, tmp_path) -> None:
    """An anonymiser blanked the frame of reference: contours could not be placed, so no file."""
    folder = tmp_path / "blank"
    folder.mkdir()
    for source in sorted((phantom_dir / "Images" / "Phantom_000").glob("*.dcm")):
        ds = pydicom.dcmread(source)
        ds.FrameOfReferenceUID = ""
        ds.save_as(folder / source.name)
    volume = load_series(folder)
    with pytest.raises(CTSegError, match="no FrameOfReferenceUID"):
        save_rtstruct(np.ones(volume.shape, np.uint8), volume, tmp_path / "x.rtstruct.dcm")
    assert not (tmp_path / "x.rtstruct.dcm").exists()
