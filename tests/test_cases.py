"""Case discovery in every supported layout, and mask loading checked against its volume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ctseg.data import Case, discover_cases
from ctseg.errors import CTSegError, MaskError
from ctseg.io import load_mask, load_series, save_nifti


def test_seed_layout(phantom_dir):
    cases = discover_cases(phantom_dir)
    assert [c.name for c in cases] == ["Phantom_000", "Phantom_001", "Phantom_002"]
    first = cases[0]
    assert first.image == phantom_dir / "Images" / "Phantom_000"
    assert first.label == phantom_dir / "Segmentations" / "Phantom_000_seg.npz"
    assert first.as_dict() == {"image": str(first.image), "label": str(first.label),
                               "case": "Phantom_000"}


def test_seed_layout_case_without_mask(phantom_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_dir, root)
    (root / "Segmentations" / "Phantom_001_seg.npz").unlink()
    cases = {c.name: c for c in discover_cases(root)}
    assert cases["Phantom_001"].label is None
    assert cases["Phantom_001"].as_dict()["label"] is None


def test_folder_per_case_layout(phantom_dir, tmp_path):
    root = tmp_path / "cases"
    # DICOM nested one level deeper, mask inside the folder
    shutil.copytree(phantom_dir / "Images" / "Phantom_000", root / "alpha" / "CT" / "series1")
    volume = load_series(root / "alpha")
    mask = load_mask(phantom_dir / "Segmentations" / "Phantom_000_seg.npz", volume)
    save_nifti(mask, volume.affine, root / "alpha" / "mask.nii.gz")
    # mask beside the folder
    shutil.copytree(phantom_dir / "Images" / "Phantom_001", root / "beta")
    save_nifti(np.zeros((16, 64, 64), np.uint8), volume.affine, root / "beta_seg.nii.gz")
    # no mask at all; and a folder without images, which is skipped
    shutil.copytree(phantom_dir / "Images" / "Phantom_002", root / "gamma")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a case")
    cases = discover_cases(root)
    assert [(c.name, c.label.name if c.label else None) for c in cases] == [
        ("alpha", "mask.nii.gz"), ("beta", "beta_seg.nii.gz"), ("gamma", None)]
    assert cases[0].image == root / "alpha"


def test_nifti_cases(tmp_path):
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    save_nifti(np.zeros((4, 8, 8), np.float32), affine, tmp_path / "c1.nii.gz")
    save_nifti(np.ones((4, 8, 8), np.uint8), affine, tmp_path / "c1_seg.nii.gz")
    (tmp_path / "c2").mkdir()
    save_nifti(np.zeros((4, 8, 8), np.float32), affine, tmp_path / "c2" / "image.nii.gz")
    cases = discover_cases(tmp_path)
    assert [(c.name, c.image.name, c.label.name if c.label else None) for c in cases] == [
        ("c1", "c1.nii.gz", "c1_seg.nii.gz"), ("c2", "image.nii.gz", None)]


def test_single_series_folder_is_one_case(phantom_dir):
    cases = discover_cases(phantom_dir / "Images" / "Phantom_002")
    assert cases == [Case("Phantom_002", phantom_dir / "Images" / "Phantom_002", None)]


def test_empty_or_missing_folder(tmp_path):
    with pytest.raises(CTSegError, match="no cases found"):
        discover_cases(tmp_path)
    with pytest.raises(CTSegError, match="not found"):
        discover_cases(tmp_path / "missing")


def test_load_mask_npz_and_nifti_agree(phantom_dir, tmp_path):
    volume = load_series(phantom_dir / "Images" / "Phantom_000")
    npz_mask = load_mask(phantom_dir / "Segmentations" / "Phantom_000_seg.npz", volume)
    assert npz_mask.dtype == np.uint8 and npz_mask.shape == volume.shape
    save_nifti(npz_mask, volume.affine, tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(load_mask(tmp_path / "m.nii.gz", volume), npz_mask)


def test_load_mask_reorients_nifti_stored_in_another_axis_order(phantom_dir, tmp_path):
    import nibabel as nib

    volume = load_series(phantom_dir / "Images" / "Phantom_000")
    mask = load_mask(phantom_dir / "Segmentations" / "Phantom_000_seg.npz", volume)
    image = nib.Nifti1Image(mask.transpose(2, 1, 0), volume.affine)
    flipped = image.as_reoriented(np.array([[0, -1], [1, 1], [2, -1]]))  # LAI instead of LPS->RAS
    nib.save(flipped, tmp_path / "flipped.nii.gz")
    np.testing.assert_array_equal(load_mask(tmp_path / "flipped.nii.gz", volume), mask)


def test_load_mask_refusals(phantom_dir, tmp_path):
    volume = load_series(phantom_dir / "Images" / "Phantom_000")
    np.savez(tmp_path / "short.npz", masks=np.zeros((15, 64, 64), np.uint8))
    with pytest.raises(MaskError, match=r"short.npz: mask shape \(15, 64, 64\)"):
        load_mask(tmp_path / "short.npz", volume)
    np.savez(tmp_path / "key.npz", labels=np.zeros((16, 64, 64), np.uint8))
    with pytest.raises(MaskError, match="no 'masks' array"):
        load_mask(tmp_path / "key.npz", volume)
    np.savez(tmp_path / "neg.npz", masks=-np.ones((16, 64, 64), np.int64))
    with pytest.raises(MaskError, match="not labels"):
        load_mask(tmp_path / "neg.npz", volume)
    shifted = volume.affine.copy()
    shifted[:3, 3] += 5.0
    save_nifti(np.zeros(volume.shape, np.uint8), shifted, tmp_path / "shifted.nii.gz")
    with pytest.raises(MaskError, match="geometry does not match"):
        load_mask(tmp_path / "shifted.nii.gz", volume)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(MaskError, match="unreadable"):
        load_mask(tmp_path / "broken.npz", volume)
    with pytest.raises(MaskError, match="not found"):
        load_mask(tmp_path / "missing.npz", volume)
