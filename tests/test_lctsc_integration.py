"""Real thoracic CT (LCTSC sample in ../shared): masks land on lung, convert matches SimpleITK.

Skipped when `../shared/data/lctsc` is absent (fresh clones, CI without the data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ctseg.cli import main
from ctseg.data import discover_cases
from ctseg.io import load_mask, load_series

LCTSC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lctsc"
CASES = ["Case_000", "Case_005", "Case_009"]

pytestmark = pytest.mark.skipif(not LCTSC.is_dir(), reason=f"{LCTSC} not present")


@pytest.fixture(scope="module")
def volumes():
    return {case: load_series(LCTSC / "Images" / case) for case in CASES}


def test_discovers_the_seed_layout():
    cases = discover_cases(LCTSC)
    assert [c.name for c in cases] == CASES
    assert all(c.label == LCTSC / "Segmentations" / f"{c.name}_seg.npz" for c in cases)


@pytest.mark.parametrize("case", CASES)
def test_mask_falls_on_lung(volumes, case):
    volume = volumes[case]
    mask = load_mask(LCTSC / "Segmentations" / f"{case}_seg.npz", volume)
    assert mask.any()
    assert (volume.array[mask > 0] < -500).mean() > 0.8


def test_case_005_file_order_is_scrambled_but_slices_are_not(volumes):
    names = sorted((LCTSC / "Images" / "Case_005").glob("*.dcm"))
    z_by_name = [float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation) for f in names]
    steps = np.sign(np.diff(z_by_name))
    assert (steps > 0).any() and (steps < 0).any()  # neither ascending nor descending
    z_loaded = [float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation)
                for f in volumes["Case_005"].files]
    assert z_loaded == sorted(z_loaded)


def test_intercept_differs_between_scanners(volumes):
    intercepts = {case: float(pydicom.dcmread(volumes[case].files[0],
                                              stop_before_pixels=True).RescaleIntercept)
                  for case in ("Case_000", "Case_009")}
    assert intercepts == {"Case_000": -1024.0, "Case_009": -1000.0}
    for case in ("Case_000", "Case_009"):  # air outside the patient reads about -1000 HU in both
        corner = volumes[case].array[:, :20, :20]
        assert np.median(corner) == pytest.approx(-1000, abs=30)


@pytest.mark.parametrize("case", CASES)
def test_convert_matches_simpleitk(tmp_path, case):
    folder = LCTSC / "Images" / case
    out = tmp_path / f"{case}.nii.gz"
    assert main(["convert", str(folder), str(out)]) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    dicom = reader.Execute()
    nifti = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nifti), sitk.GetArrayFromImage(dicom))
    np.testing.assert_allclose(nifti.GetOrigin(), dicom.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(nifti.GetSpacing(), dicom.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(nifti.GetDirection(), dicom.GetDirection(), atol=1e-6)
