"""DICOM series loading: order, HU, geometry against SimpleITK, compressed syntaxes, the CLI."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless

from ctseg.cli import main
from ctseg.io import load_series


def _bundled(name: str) -> str:
    """A test file shipped inside pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return path


def _sitk_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """SimpleITK geometry (LPS, voxel axes x, y, z) as the RAS affine nibabel expects."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def assert_matches_simpleitk(volume, image: sitk.Image) -> None:
    np.testing.assert_allclose(volume.array, sitk.GetArrayFromImage(image), atol=1e-3)
    np.testing.assert_allclose(volume.affine, _sitk_affine_ras(image), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing()[::-1], atol=1e-5)


@pytest.mark.parametrize("case", ["Phantom_000", "Phantom_001", "Phantom_002"])
def test_phantom_matches_simpleitk(phantom_dir, case):
    folder = phantom_dir / "Images" / case
    volume = load_series(folder)
    assert volume.array.dtype == np.float32
    assert volume.metadata["order_key"] == "ImagePositionPatient"
    assert volume.metadata["modality"] == "CT"
    assert_matches_simpleitk(volume, _sitk_series(folder))


def test_files_are_ordered_by_position_not_name(phantom_dir):
    volume = load_series(phantom_dir / "Images" / "Phantom_000")
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
         for f in volume.files]
    assert z == sorted(z)
    assert [f.name for f in volume.files] != sorted(f.name for f in volume.files)


def test_metadata_is_not_identifying(phantom_dir):
    volume = load_series(phantom_dir / "Images" / "Phantom_000")
    ds = pydicom.dcmread(volume.files[0])
    assert set(volume.metadata) == {"series_uid", "modality", "manufacturer", "kernel", "order_key"}
    flat = repr(volume.metadata)
    for value in (str(ds.PatientName), ds.PatientID, ds.StudyDate):
        assert value not in flat


def test_no_patient_identifiers_in_logs_metadata_or_nifti(tmp_path, caplog):
    from ctseg.data.phantom import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "data", n_cases=1, rows=32, cols=32, slices=6,
                                 patient_name="SECRET^NAME", patient_id="SECRET-ID")
    folder = root / "Images" / "Phantom_000"
    (folder / "notes.txt").write_text("not DICOM")  # exercise the ignored-file note too
    date = pydicom.dcmread(next(folder.glob("*.dcm"))).StudyDate
    with caplog.at_level(logging.DEBUG):
        assert main(["convert", str(folder), str(tmp_path / "ct.nii")]) == 0
        volume = load_series(folder)
    assert "ignored notes.txt" in caplog.text
    for secret in ("SECRET", date):
        assert secret not in caplog.text and secret not in repr(volume.metadata)
        assert secret.encode() not in (tmp_path / "ct.nii").read_bytes()


@pytest.mark.parametrize("orientation", [
    (1, 0, 0, 0, 1, 0),  # axial, head first
    (-1, 0, 0, 0, 1, 0),  # axial, feet first
    (1, 0, 0, 0, 0, -1),  # coronal
    (0, 1, 0, 0, 0, -1),  # sagittal
    (0.9848077, 0.1736482, 0, -0.1736482, 0.9848077, 0),  # rotated in plane
    (1, 0, 0, 0, 0.8660254, -0.5),  # oblique
])
def test_orientations_match_simpleitk(write_series, orientation):
    stored = np.random.default_rng(1).integers(0, 3000, size=(6, 12, 10)).astype(np.int16)
    paths = write_series(stored, orientation=orientation, spacing=2.5)
    volume = load_series(paths[0].parent)
    assert_matches_simpleitk(volume, _sitk_series(paths[0].parent))
    np.testing.assert_array_equal(volume.array, stored - 1024)


def test_descending_positions_are_flipped_to_ascending(write_series):
    stored = np.arange(5 * 4 * 4, dtype=np.int16).reshape(5, 4, 4)
    paths = write_series(stored, spacing=-3.0)  # slice k sits 3 mm *below* slice k-1
    volume = load_series(paths[0].parent)
    np.testing.assert_array_equal(volume.array, stored[::-1] - 1024.0)
    assert volume.spacing[0] == pytest.approx(3.0)
    assert volume.files == paths[::-1]


def test_per_slice_rescale(write_series):
    stored = np.full((4, 4, 4), 1000, dtype=np.int16)
    paths = write_series(stored, per_slice=lambda k: {"slope": [1, 2, 0.5, 1][k],
                                                      "intercept": [-1024, -1000, 0, 5][k]})
    volume = load_series(paths[0].parent)
    assert volume.array[:, 0, 0].tolist() == [-24.0, 1000.0, 500.0, 1005.0]


def test_bits_stored_below_bits_allocated(write_series):
    # 12-bit signed values: -5 stored as 0xFFB in the low 12 bits with junk above;
    # 12-bit unsigned values with an overlay bit set above bit 11.
    signed = np.full((2, 3, 3), 0x0FFB, dtype=np.int16)
    paths = write_series(signed, bits_stored=12, intercept=0)
    assert load_series(paths[0].parent).array.max() == -5
    unsigned = np.full((2, 3, 3), 0x8000 | 1500, dtype=np.uint16)
    paths = write_series(unsigned.view(np.int16), bits_stored=12, signed=False, intercept=-1024)
    assert np.all(load_series(paths[0].parent).array == 1500 - 1024)


def test_ordering_fallbacks(write_series, caplog):
    stored = np.arange(4 * 3 * 3, dtype=np.int16).reshape(4, 3, 3)

    def no_position(k, ds):
        del ds.ImagePositionPatient

    paths = write_series(stored, per_slice=lambda k: {"slice_location": 10.0 + 2 * k},
                         edit=no_position)
    volume = load_series(paths[0].parent)
    assert volume.metadata["order_key"] == "SliceLocation"
    assert volume.spacing[0] == pytest.approx(2.0)
    np.testing.assert_array_equal(volume.array, stored - 1024.0)

    def instance_only(k, ds):
        del ds.ImagePositionPatient
        ds.InstanceNumber = 10 - k  # descending instances: reversed volume

    paths = write_series(stored, edit=instance_only)
    with caplog.at_level(logging.WARNING, logger="ctseg.io.dicom"):
        volume = load_series(paths[0].parent)
    assert volume.metadata["order_key"] == "InstanceNumber"
    np.testing.assert_array_equal(volume.array, stored[::-1] - 1024.0)
    assert "InstanceNumber" in caplog.text


def test_files_without_preamble_or_file_meta(write_series, tmp_path):
    stored = np.arange(3 * 4 * 4, dtype=np.int16).reshape(3, 4, 4)
    paths = write_series(stored)
    for path in paths:  # rewrite as a bare implicit-VR dataset, as old archives hold them
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(tmp_path / path.name, implicit_vr=True, little_endian=True)
        assert (tmp_path / path.name).read_bytes()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(load_series(tmp_path).array, stored - 1024.0)


def test_pydicom_bundled_ct_slice():
    path = _bundled("CT_small.dcm")
    volume = load_series(path)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[0], expected)
    image = sitk.ReadImage(path)
    np.testing.assert_allclose(volume.array, sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(volume.affine[:3, :2], _sitk_affine_ras(image)[:3, :2], atol=1e-5)
    np.testing.assert_allclose(volume.affine[:3, 3], _sitk_affine_ras(image)[:3, 3], atol=1e-4)
    assert volume.spacing[0] == pytest.approx(float(ds.SliceThickness))
    assert volume.metadata["kernel"]  # non-identifying fields survive


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_implicit.dcm"])
def test_bundled_transfer_syntaxes_decode_like_uncompressed(name):
    reference = load_series(_bundled("MR_small.dcm"))
    volume = load_series(_bundled(name))
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_allclose(volume.affine, reference.affine)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series(phantom_dir, tmp_path, syntax):
    source = phantom_dir / "Images" / "Phantom_002"
    for path in source.iterdir():
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
    np.testing.assert_array_equal(load_series(tmp_path).array, load_series(source).array)


def test_cli_convert(phantom_dir, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert main(["convert", str(phantom_dir / "Images" / "Phantom_000"), str(out)]) == 0
    assert "16 slices" in capsys.readouterr().out
    assert_matches_simpleitk(load_series(phantom_dir / "Images" / "Phantom_000"),
                             sitk.ReadImage(str(out)))


def test_cli_convert_refusal_is_one_message(phantom_dir, tmp_path, capsys):
    folder = tmp_path / "two"
    shutil.copytree(phantom_dir / "Images" / "Phantom_000", folder / "a")
    shutil.copytree(phantom_dir / "Images" / "Phantom_001", folder / "b")
    assert main(["convert", str(folder), str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ctseg convert: error:") and "2 image series" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.nii.gz").exists()
    uid = pydicom.dcmread(next((folder / "b").iterdir())).SeriesInstanceUID
    assert main(["convert", str(folder), str(tmp_path / "b.nii.gz"), "--series", uid]) == 0
