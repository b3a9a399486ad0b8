"""Inputs beyond DICOM series folders: NRRD, MHA/MHD, NIfTI and a multi-frame (enhanced) CT file.

Each is written by the test from a real DICOM series and must load with the DICOM loader's
conventions (z, y, x float32 HU, RAS affine), checked against SimpleITK's reading of the same
file; `ctseg convert` and case discovery take them like DICOM folders.
"""

from __future__ import annotations

import copy
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from ctseg.cli import main
from ctseg.data import discover_cases
from ctseg.errors import CTSegError, DicomError
from ctseg.io import load_image, load_series, save_nifti
from ctseg.io.dicom import scan_series
from ctseg.io.formats import image_stem

OBLIQUE = (1, 0, 0, 0, 0.8660254, -0.5)


def _sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _matches_simpleitk(volume, path) -> None:
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image).astype(np.float32))
    np.testing.assert_allclose(volume.affine, _sitk_affine_ras(image), atol=1e-6)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing()[::-1], atol=1e-9)


@pytest.fixture
def series(write_series):
    """A real oblique DICOM series and ctseg's reading of it."""
    stored = np.random.default_rng(23).integers(0, 3000, size=(7, 12, 10)).astype(np.int16)
    paths = write_series(stored, orientation=OBLIQUE, spacing=2.0)
    return paths, load_series(paths[0].parent)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".nhdr"])
def test_itk_formats_load_like_the_dicom_series(series, tmp_path, suffix):
    paths, dicom = series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(sitk.Cast(reader.Execute(), sitk.sitkInt16), str(path))
    volume = load_image(path)
    assert volume.array.dtype == np.float32
    _matches_simpleitk(volume, path)
    np.testing.assert_array_equal(volume.array, dicom.array)
    np.testing.assert_allclose(volume.affine, dicom.affine, atol=1e-4)
    np.testing.assert_allclose(volume.spacing, dicom.spacing, atol=1e-6)


def test_nifti_loads_like_the_dicom_series(series, tmp_path):
    _, dicom = series
    path = save_nifti(dicom.array, dicom.affine, tmp_path / "scan.nii.gz")
    volume = load_image(path)
    _matches_simpleitk(volume, path)
    np.testing.assert_array_equal(volume.array, dicom.array)


def _enhanced(paths, out, shuffle=True) -> None:
    """The single-frame files as one Enhanced CT Image Storage file (functional groups)."""
    frames = [pydicom.dcmread(p) for p in paths]
    order = np.random.default_rng(0).permutation(len(frames)) if shuffle else range(len(frames))
    frames = [frames[i] for i in order]
    first = frames[0]
    ds = copy.deepcopy(first)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "SliceThickness", "RescaleSlope", "RescaleIntercept", "InstanceNumber"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(frames)
    ds.PixelData = b"".join(f.PixelData for f in frames)

    def item(**values) -> Sequence:
        entry = Dataset()
        for keyword, value in values.items():
            setattr(entry, keyword, value)
        return Sequence([entry])

    shared = Dataset()
    shared.PixelMeasuresSequence = item(PixelSpacing=first.PixelSpacing,
                                        SliceThickness=first.SliceThickness)
    shared.PlaneOrientationSequence = item(ImageOrientationPatient=first.ImageOrientationPatient)
    shared.PixelValueTransformationSequence = item(
        RescaleSlope=first.RescaleSlope, RescaleIntercept=first.RescaleIntercept,
        RescaleType="HU")
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k, f in enumerate(frames):
        group = Dataset()
        group.PlanePositionSequence = item(ImagePositionPatient=f.ImagePositionPatient)
        group.FrameContentSequence = item(InStackPositionNumber=k + 1)
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(out, enforce_file_format=True)


def test_enhanced_multiframe_ct_file_loads_like_the_series(series, tmp_path):
    paths, dicom = series
    path = tmp_path / "enhanced.dcm"
    _enhanced(paths, path)
    volume = load_image(path)
    assert volume.files == [path]
    np.testing.assert_array_equal(volume.array, dicom.array)  # frames reordered by position
    np.testing.assert_allclose(volume.affine, dicom.affine, atol=1e-6)
    np.testing.assert_allclose(volume.spacing, dicom.spacing, atol=1e-9)
    _enhanced(paths, tmp_path / "sorted.dcm", shuffle=False)  # SimpleITK keeps frame order
    _matches_simpleitk(load_image(tmp_path / "sorted.dcm"), tmp_path / "sorted.dcm")


def test_enhanced_multiframe_with_a_gap_is_refused(series, tmp_path):
    paths, _ = series
    path = tmp_path / "gap.dcm"
    _enhanced(paths[:3] + paths[4:], path)
    with pytest.raises(DicomError, match="uneven slice spacing"):
        load_image(path)


def test_unreadable_or_not_3d_itk_files_are_refused(tmp_path):
    bad = tmp_path / "bad.nrrd"
    bad.write_text("NRRD0004\ntype: what\n")
    with pytest.raises(CTSegError, match="bad.nrrd: unreadable image file"):
        load_image(bad)
    flat = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.Image(4, 4, sitk.sitkInt16), str(flat))
    with pytest.raises(CTSegError, match="expected a 3D grayscale image"):
        load_image(flat)


def test_convert_and_case_discovery_take_the_new_formats(series, tmp_path, capsys):
    paths, dicom = series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(sitk.Cast(reader.Execute(), sitk.sitkInt16), str(cases / "a.nrrd"))
    (cases / "b").mkdir()
    sitk.WriteImage(sitk.Cast(reader.Execute(), sitk.sitkInt16), str(cases / "b" / "image.mha"))
    labels = (dicom.array > 0).astype(np.uint8)
    save_nifti(labels, dicom.affine, cases / "a_seg.nii.gz")
    found = {c.name: c for c in discover_cases(cases)}
    assert set(found) == {"a", "b"}
    assert found["a"].label == cases / "a_seg.nii.gz" and found["b"].image.name == "image.mha"
    out = tmp_path / "a.nii.gz"
    assert main(["convert", str(cases / "a.nrrd"), str(out)]) == 0
    converted = nib.load(out)
    np.testing.assert_array_equal(np.asarray(converted.dataobj).transpose(2, 1, 0), dicom.array)
    np.testing.assert_allclose(converted.affine, dicom.affine, atol=1e-4)
    assert image_stem(cases / "a.nrrd") == "a" and image_stem(paths[0]) is None


def test_predict_takes_nrrd_input_and_a_series_choice(tmp_path_factory, phantom_dir, tmp_path):
    from infer_helpers import tiny_run

    run = tiny_run(tmp_path_factory, phantom_dir)
    images = phantom_dir / "Images"
    reference = tmp_path / "reference"
    assert main(["predict", "--model", str(run), "--input", str(images / "Phantom_001"),
                 "--output", str(reference), "--device", "cpu"]) == 0
    nrrd = tmp_path / "Phantom_001.nrrd"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(images / "Phantom_001")))
    sitk.WriteImage(sitk.Cast(reader.Execute(), sitk.sitkInt16), str(nrrd))
    study = tmp_path / "study"  # one case folder, two series of 16 slices: no automatic choice
    study.mkdir()
    for prefix, case in (("a", "Phantom_000"), ("b", "Phantom_001")):
        for path in (images / case).iterdir():
            shutil.copy(path, study / f"{prefix}_{path.name}")
    assert main(["predict", "--model", str(run), "--input", str(study), "--output",
                 str(tmp_path / "unchosen"), "--device", "cpu"]) == 1
    index = next(i.index for i in scan_series(study) if i.headers[0].path.name.startswith("b_"))
    for source, out, extra in ((nrrd, tmp_path / "from_nrrd", []),
                               (study, tmp_path / "chosen", ["--series", str(index)])):
        assert main(["predict", "--model", str(run), "--input", str(source), "--output", str(out),
                     "--device", "cpu", *extra]) == 0
        got = nib.load(next(out.glob("*.nii.gz")))
        want = nib.load(reference / "Phantom_001.nii.gz")
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-4)


def test_enhanced_file_alone_in_a_case_folder_is_read(series, tmp_path):
    paths, dicom = series
    folder = tmp_path / "case"
    folder.mkdir()
    _enhanced(paths, folder / "IM0001")
    assert [c.name for c in discover_cases(folder)] == ["case"]
    np.testing.assert_array_equal(load_image(folder).array, dicom.array)
    (folder / "notes.txt").write_text("the folder holds more than the file: read as a series")
    with pytest.raises(DicomError, match="give the file itself as the input"):
        load_image(folder)
