"""Every input `load_series` must refuse (or skip with a note), written as real DICOM files."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from ctseg.errors import DicomError
from ctseg.io import load_series
from ctseg.io.redact import mask_uid


def _bundled(name: str) -> str:
    """A test file shipped inside pydicom (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return path


@pytest.fixture
def stored():
    return np.random.default_rng(7).integers(0, 2000, size=(6, 8, 8)).astype(np.int16)


def test_truncated_pixel_data(write_series, stored):
    paths = write_series(stored)
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) - 20])
    with pytest.raises(DicomError, match=rf"{paths[3].name}: truncated pixel data"):
        load_series(paths[0].parent)


def test_truncated_header(write_series, stored):
    paths = write_series(stored)
    paths[2].write_bytes(paths[2].read_bytes()[:300])
    with pytest.raises(DicomError, match=rf"{paths[2].name}: (unreadable|image header but no)"):
        load_series(paths[0].parent)


def test_truncated_before_pixel_data(write_series, stored):
    paths = write_series(stored)
    ds = pydicom.dcmread(paths[1])
    del ds.PixelData
    ds.save_as(paths[1], enforce_file_format=True)
    with pytest.raises(DicomError, match=rf"{paths[1].name}: image header but no pixel data"):
        load_series(paths[0].parent)


def test_garbage_after_dicom_magic(write_series, stored):
    paths = write_series(stored)
    bad = paths[0].parent / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    with pytest.raises(DicomError, match="bad.dcm: unreadable DICOM file"):
        load_series(paths[0].parent)


def test_several_series_the_largest_is_read_and_one_can_be_chosen(write_series, stored, tmp_path,
                                                                    caplog):
    folder = tmp_path / "mixed"
    a = write_series(stored, folder / "a", series_uid="1.2.3.4")
    b = write_series(stored[:3] + 5, folder / "b", series_uid="1.2.3.5")
    with caplog.at_level(logging.INFO, logger="ctseg.io"):
        assert load_series(folder).files == a  # 6 slices beat 3
    assert f"reading series 1: {mask_uid('1.2.3.4')} CT" in caplog.text
    assert "1.2.3.4" not in caplog.text  # UIDs embed dates: only their digest is shown
    volume = load_series(folder, series="1.2.3.5")
    assert volume.files == b and volume.metadata["series_uid"] == "1.2.3.5"
    assert load_series(folder, series="2").files == b
    assert load_series(folder, series=mask_uid("1.2.3.5")).files == b
    with pytest.raises(DicomError, match="no series") as err:
        load_series(folder, series="9.9")
    assert "1.2.3.4" not in str(err.value) and mask_uid("1.2.3.4") in str(err.value)


def test_equally_good_series_are_not_guessed(write_series, stored, tmp_path):
    folder = tmp_path / "two"
    write_series(stored, folder / "a", series_uid="1.2.3.4")
    write_series(stored + 5, folder / "b", series_uid="1.2.3.5")
    with pytest.raises(DicomError, match="2 CT series with 6 slices; choose one with --series"):
        load_series(folder)


def test_conflicting_duplicate_positions(write_series, stored):
    paths = write_series(stored)
    ds = pydicom.dcmread(paths[2])
    ds.PixelData = (stored[2] + 1).tobytes()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(paths[0].parent / "copy.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match="duplicate slice position.*different pixels") as err:
        load_series(paths[0].parent)
    assert paths[2].name in str(err.value) and "copy.dcm" in str(err.value)


def test_identical_duplicates_are_dropped(write_series, stored, caplog):
    paths = write_series(stored)
    shutil.copy(paths[4], paths[0].parent / "again.dcm")
    with caplog.at_level(logging.INFO, logger="ctseg.io.dicom"):
        volume = load_series(paths[0].parent)
    np.testing.assert_array_equal(volume.array, stored - 1024.0)
    assert len(volume.files) == 6
    assert "identical duplicate" in caplog.text


@pytest.mark.parametrize("change, message", [
    ({"pixel_spacing": (0.75, 0.9)}, "inconsistent PixelSpacing"),
    ({"orientation": (1, 0, 0, 0, 0.99, 0.141)}, "inconsistent ImageOrientationPatient"),
])
def test_inconsistent_geometry(write_series, stored, change, message):
    paths = write_series(stored, per_slice=lambda k: change if k == 3 else {})
    with pytest.raises(DicomError, match=message) as err:
        load_series(paths[0].parent)
    assert paths[3].name in str(err.value)


def test_inconsistent_rows_and_columns(write_series, stored, tmp_path):
    folder = tmp_path / "rows"
    write_series(stored, folder, series_uid="1.2.3", spacing=2.0)
    odd = write_series(np.zeros((1, 8, 6), np.int16), folder / "extra", series_uid="1.2.3",
                       origin=(-30.0, -20.0, 0.0))
    with pytest.raises(DicomError, match=r"inconsistent Rows/Columns.*8x6") as err:
        load_series(folder)
    assert odd[0].name in str(err.value)


def test_gap_is_refused(write_series, stored):
    positions = [(0.0, 0.0, 2.5 * k) for k in (0, 1, 2, 4, 5, 6)]  # slice at 7.5 mm missing
    paths = write_series(stored, positions=positions)
    with pytest.raises(DicomError, match=r"uneven slice spacing.*5\.000 mm between") as err:
        load_series(paths[0].parent)
    assert paths[2].name in str(err.value) and paths[3].name in str(err.value)


def test_small_position_jitter_is_accepted(write_series, stored):
    positions = [(0.0, 0.0, 2.5 * k + (0.01 if k % 2 else 0.0)) for k in range(6)]
    paths = write_series(stored, positions=positions)
    assert load_series(paths[0].parent).spacing[0] == pytest.approx(2.5, abs=0.01)


def test_gantry_tilt_warns(write_series, stored, caplog):
    positions = [(0.0, 0.5 * k, 2.5 * k) for k in range(6)]  # stack drifts in y: tilted gantry
    paths = write_series(stored, positions=positions)
    with caplog.at_level(logging.WARNING, logger="ctseg.io.dicom"):
        load_series(paths[0].parent)
    assert "gantry tilt" in caplog.text


def test_non_image_objects_are_skipped_with_a_note(write_series, stored, caplog):
    paths = write_series(stored)
    folder = paths[0].parent
    for name in ("rtstruct.dcm", "rtdose.dcm", "test-SR.dcm", "liver_1frame.dcm",
                 "ExplVR_LitEndNoMeta.dcm", "image_dfl.dcm"):
        shutil.copy(_bundled(name), folder / name)
    scout = pydicom.dcmread(paths[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImagePositionPatient = [0, 0, 500]
    scout.save_as(folder / "scout.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("exported by PACS")
    (folder / "sub").mkdir()
    (folder / "sub" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # found recursively
    shutil.copy(_bundled("rtplan.dcm"), folder / "sub" / "plan.dcm")
    with caplog.at_level(logging.INFO, logger="ctseg.io.dicom"):
        with pytest.raises(DicomError, match="sub/DICOMDIR: unreadable"):
            load_series(folder)
    shutil.copy(_bundled("DICOMDIR"), folder / "sub" / "DICOMDIR")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ctseg.io.dicom"):
        volume = load_series(folder)
    np.testing.assert_array_equal(volume.array, stored - 1024.0)
    for note in ("rtstruct.dcm: RT Structure Set", "rtdose.dcm: RT Dose", "scout.dcm: localizer",
                 "notes.txt: not a DICOM file", "sub/plan.dcm: RT Plan", "test-SR.dcm: no pixel",
                 "sub/DICOMDIR: DICOMDIR", "liver_1frame.dcm: Segmentation",
                 "ExplVR_LitEndNoMeta.dcm: radiotherapy", "image_dfl.dcm: Secondary Capture"):
        assert note in caplog.text


def test_only_non_image_objects(tmp_path):
    shutil.copy(_bundled("rtstruct.dcm"), tmp_path / "rs.dcm")
    with pytest.raises(DicomError, match="no DICOM image series"):
        load_series(tmp_path)


def test_multiframe_is_refused(write_series, stored, tmp_path):
    def two_frames(k, ds):
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    write_series(stored[:1], tmp_path, edit=two_frames)
    with pytest.raises(DicomError, match="multi-frame"):
        load_series(tmp_path)


def test_missing_and_empty(tmp_path):
    with pytest.raises(DicomError, match="no such file"):
        load_series(tmp_path / "nope")
    with pytest.raises(DicomError, match="holds no files"):
        load_series(tmp_path)


def test_missing_pixel_spacing(write_series, stored):
    def drop(k, ds):
        del ds.PixelSpacing

    paths = write_series(stored, edit=drop)
    with pytest.raises(DicomError, match="PixelSpacing missing"):
        load_series(paths[0].parent)
