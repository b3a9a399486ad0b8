"""The built-in phantom: real DICOM, seed layout, anatomy where it should be, no identity leaks."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from ctseg.cli import main
from ctseg.data.phantom import phantom_case, write_phantom_dataset
from ctseg.io import load_mask, load_series

PHANTOM_SHAPE = (16, 64, 64)  # as written by the phantom_dir fixture in conftest.py


def test_seed_layout_and_masks(phantom_dir):
    cases = sorted(p.name for p in (phantom_dir / "Images").iterdir())
    assert cases == ["Phantom_000", "Phantom_001", "Phantom_002"]
    for case in cases:
        files = list((phantom_dir / "Images" / case).glob("*.dcm"))
        assert len(files) == PHANTOM_SHAPE[0]
        with np.load(phantom_dir / "Segmentations" / f"{case}_seg.npz") as npz:
            masks = npz["masks"]
        assert masks.shape == PHANTOM_SHAPE
        assert set(np.unique(masks)) == {0, 1}


def test_real_ct_dicom_with_intercept_storage(phantom_dir):
    path = next((phantom_dir / "Images" / "Phantom_000").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
    assert ds.Modality == "CT"
    assert (ds.BitsAllocated, ds.PixelRepresentation) == (16, 1)
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert ds.pixel_array.dtype == np.int16
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
                    "PixelSpacing", "SliceThickness"):
        assert keyword in ds


def test_file_names_and_instance_numbers_do_not_follow_anatomy(phantom_dir):
    orders = []
    for case in ("Phantom_000", "Phantom_001"):
        files = sorted((phantom_dir / "Images" / case).glob("*.dcm"))
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        z = [float(h.SliceLocation) for h in headers]
        instance_vs_z = np.corrcoef([int(h.InstanceNumber) for h in headers], z)[0, 1]
        orders.append((z == sorted(z), instance_vs_z))
    assert orders[0][0] is False  # shuffled names
    assert orders[1][1] < -0.99  # descending instance numbers


def test_identifiers_are_random_per_case_and_never_the_case_name(phantom_dir):
    seen = set()
    for case in ("Phantom_000", "Phantom_001", "Phantom_002"):
        ds = pydicom.dcmread(next((phantom_dir / "Images" / case).glob("*.dcm")))
        assert case not in str(ds.PatientName) and case not in ds.PatientID
        assert ds.StudyDate
        seen.add((str(ds.PatientName), ds.PatientID))
    assert len(seen) == 3


def test_identity_override(tmp_path):
    write_phantom_dataset(tmp_path, n_cases=1, rows=32, cols=32, slices=6,
                          patient_name="SECRET^NAME", patient_id="SECRET-ID")
    ds = pydicom.dcmread(next((tmp_path / "Images" / "Phantom_000").glob("*.dcm")))
    assert (str(ds.PatientName), ds.PatientID) == ("SECRET^NAME", "SECRET-ID")


def test_deterministic_and_replaces_case_folders(tmp_path):
    write_phantom_dataset(tmp_path / "a", n_cases=1, seed=3, rows=32, cols=32, slices=6)
    write_phantom_dataset(tmp_path / "b", n_cases=1, seed=3, rows=32, cols=32, slices=6)
    write_phantom_dataset(tmp_path / "b", n_cases=1, seed=3, rows=32, cols=32, slices=6)
    a = load_series(tmp_path / "a" / "Images" / "Phantom_000")
    b = load_series(tmp_path / "b" / "Images" / "Phantom_000")
    np.testing.assert_array_equal(a.array, b.array)
    assert len(list((tmp_path / "b" / "Images").iterdir())) == 1


def test_anatomy(phantom_dir):
    volume = load_series(phantom_dir / "Images" / "Phantom_000")
    mask = load_mask(phantom_dir / "Segmentations" / "Phantom_000_seg.npz", volume)
    hu = volume.array
    assert np.median(hu[mask > 0]) == pytest.approx(-850, abs=60)
    assert np.median(hu[:, :3, :]) < -950  # air above the body
    assert hu.max() > 500  # bone
    per_slice = mask.sum(axis=(1, 2))
    assert per_slice[0] == 0 and per_slice[-1] == 0  # lungs appear and vanish along z
    assert per_slice.max() > 0.05 * mask[0].size
    left, right = mask[..., : mask.shape[2] // 2], mask[..., mask.shape[2] // 2:]
    assert not np.array_equal(left.sum(axis=(1, 2)), right.sum(axis=(1, 2))[::-1])


def test_stored_values_match_generator(phantom_dir):
    """The DICOM holds exactly the generated HU (rounded, clipped), in ascending z."""
    slices, rows, cols = PHANTOM_SHAPE
    hu, mask, geometry = phantom_case(np.random.default_rng([0, 1]), rows, cols, slices)
    volume = load_series(phantom_dir / "Images" / "Phantom_001")
    np.testing.assert_array_equal(volume.array, np.clip(np.rint(hu), -1024, 3071))
    assert volume.spacing == pytest.approx((geometry.slice_spacing, geometry.pixel_spacing,
                                            geometry.pixel_spacing))
    x0, y0, z0 = geometry.origin
    np.testing.assert_allclose(volume.affine[:3, 3], [-x0, -y0, z0], atol=1e-3)


def test_cli_phantom(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "out"), "--cases", "2"]) == 0
    assert "2 phantom cases" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out" / "Segmentations").iterdir()) == [
        "Phantom_000_seg.npz", "Phantom_001_seg.npz"]
