"""NIfTI writing and reading: dtypes, sform/qform, atomicity, and geometry as SimpleITK sees it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctseg.errors import CTSegError, MaskError
from ctseg.io import load_nifti, load_series, save_nifti


def _affine() -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.diag([-0.8, -0.75, 2.5])
    a[:3, 3] = [30.0, 20.0, -50.0]
    return a


def test_image_round_trip_int16_with_sform_and_qform(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1024, 2000, size=(5, 6, 7)).astype(np.float32)
    path = save_nifti(hu, _affine(), tmp_path / "ct.nii.gz")
    image = nib.load(path)
    assert image.get_data_dtype() == np.int16
    assert image.shape == (7, 6, 5)  # NIfTI holds (x, y, z)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.get_sform(), _affine(), atol=1e-5)
    np.testing.assert_allclose(image.get_qform(), _affine(), atol=1e-5)
    volume = load_nifti(path)
    np.testing.assert_array_equal(volume.array, np.rint(hu))
    assert volume.spacing == pytest.approx((2.5, 0.75, 0.8))
    np.testing.assert_allclose(volume.affine, _affine(), atol=1e-5)
    # load -> save -> load is the identity
    again = load_nifti(save_nifti(volume.array, volume.affine, tmp_path / "again.nii.gz"))
    np.testing.assert_array_equal(again.array, volume.array)


def test_labels_uint8_and_gzip(tmp_path):
    labels = np.zeros((3, 4, 5), dtype=bool)
    labels[1, 2, 3] = True
    path = save_nifti(labels, _affine(), tmp_path / "mask.nii.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    image = nib.load(path)
    assert image.get_data_dtype() == np.uint8
    assert np.asarray(image.dataobj)[3, 2, 1] == 1
    multi = np.arange(60, dtype=np.int64).reshape(3, 4, 5)
    assert nib.load(save_nifti(multi, _affine(), tmp_path / "multi.nii")).get_data_dtype() == np.uint8


def test_hu_is_clipped_and_rounded(tmp_path):
    hu = np.array([[[-40000.0, -0.6, 0.4, 99999.0]]], dtype=np.float32)
    data = np.asarray(nib.load(save_nifti(hu, _affine(), tmp_path / "c.nii.gz")).dataobj)
    assert data[:, 0, 0].tolist() == [-32768, -1, 0, 32767]


def test_refusals(tmp_path):
    with pytest.raises(MaskError, match="do not fit uint8"):
        save_nifti(np.full((2, 2, 2), 300, np.int32), _affine(), tmp_path / "x.nii.gz")
    with pytest.raises(MaskError, match="integers"):
        save_nifti(np.full((2, 2, 2), 0.5), _affine(), tmp_path / "x.nii.gz", kind="label")
    with pytest.raises(CTSegError, match="kind"):
        save_nifti(np.zeros((2, 2, 2)), _affine(), tmp_path / "x.nii.gz", kind="rgb")
    with pytest.raises(CTSegError, match="ends in .nii.gz"):
        save_nifti(np.zeros((2, 2, 2)), _affine(), tmp_path / "x.img")
    with pytest.raises(CTSegError, match=r"\(z, y, x\)"):
        save_nifti(np.zeros((2, 2)), _affine(), tmp_path / "x.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"garbage")
    with pytest.raises(CTSegError, match="unreadable NIfTI"):
        load_nifti(tmp_path / "bad.nii.gz")
    assert not any(tmp_path.glob("x.nii.gz"))


def test_write_is_atomic(tmp_path):
    path = tmp_path / "ct.nii.gz"
    save_nifti(np.zeros((2, 3, 4), np.float32), _affine(), path)
    save_nifti(np.ones((2, 3, 4), np.float32), _affine(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]  # no temp files left
    assert load_nifti(path).array.max() == 1


def test_nifti_matches_simpleitk_reading_of_the_dicom(phantom_dir, tmp_path):
    """The contract that matters in 3D Slicer: same voxels, same physical geometry."""
    series = phantom_dir / "Images" / "Phantom_001"
    volume = load_series(series)
    path = save_nifti(volume.array, volume.affine, tmp_path / "ct.nii.gz")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    dicom = reader.Execute()
    nifti = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti), sitk.GetArrayFromImage(dicom))
    np.testing.assert_allclose(nifti.GetOrigin(), dicom.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(nifti.GetSpacing(), dicom.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(nifti.GetDirection(), dicom.GetDirection(), atol=1e-6)
