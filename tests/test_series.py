"""Series as real exports deliver them: anonymiser-blanked UIDs, several series in one folder.

Blank UIDs are tolerated (files grouped by descriptions, acquisition and geometry, one warning),
but nothing inconsistent is: mixed geometry, gaps, conflicting duplicates and truncated files are
still refused. Without a choice the CT series with the most slices that forms a valid volume
is read; `ctseg series` lists what a folder holds, without identifiers.
"""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from ctseg.cli import build_parser, main
from ctseg.errors import DicomError
from ctseg.io import load_series
from ctseg.io.dicom import scan_series
from ctseg.io.redact import mask_uid


@pytest.fixture
def stored():
    return np.random.default_rng(5).integers(0, 2000, size=(6, 8, 8)).astype(np.int16)


def _anonymise(k, ds):
    """What a DCMTK-based anonymiser left in the issue's export: UIDs present but empty."""
    ds.SOPClassUID = ""
    ds.SeriesInstanceUID = ""
    ds.StudyInstanceUID = ""
    ds.SOPInstanceUID = ""


def test_blanked_uids_load_like_the_original_with_one_warning(write_series, stored, tmp_path,
                                                               caplog):
    original = write_series(stored, tmp_path / "original")
    blank = write_series(stored, tmp_path / "blank", edit=_anonymise)
    ds = pydicom.dcmread(blank[0])
    assert ds.SOPClassUID == "" and ds.SeriesInstanceUID == "" and ds.SOPInstanceUID == ""
    with caplog.at_level(logging.INFO, logger="ctseg.io"):
        volume = load_series(blank[0].parent)
    reference = load_series(original[0].parent)
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.affine, reference.affine)
    assert volume.files == blank
    assert caplog.text.count("identified without a SeriesInstanceUID") == 1


def test_sop_class_missing_from_the_dataset_comes_from_the_file_meta(write_series, stored):
    paths = write_series(stored, edit=lambda k, ds: delattr(ds, "SOPClassUID"))
    assert "SOPClassUID" not in pydicom.dcmread(paths[0])
    assert load_series(paths[0].parent).shape == stored.shape


def test_blanked_series_are_told_apart_by_description(write_series, stored, tmp_path):
    folder = tmp_path / "study"
    lung = write_series(stored, folder / "lung", edit=_anonymise, per_slice=lambda k: {})
    for path in lung:
        _set(path, SeriesDescription="LUNG 1.0 B70f")
    soft = write_series(stored[:4] + 7, folder / "soft", edit=_anonymise)
    for path in soft:
        _set(path, SeriesDescription="SOFT 1.0 B30f")
    found = scan_series(folder)
    assert sorted((info.description, info.slices) for info in found) == [
        ("LUNG 1.0 B70f", 6), ("SOFT 1.0 B30f", 4)]
    assert all(info.usable and info.masked_uid == "(no UID)" for info in found)
    assert load_series(folder).files == lung
    chosen = next(info.index for info in found if info.description.startswith("SOFT"))
    assert load_series(folder, series=chosen).files == soft


def _set(path, **values):
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_blanked_uids_do_not_hide_mixed_orientations(write_series, stored):
    def sagittal(k, ds):
        _anonymise(k, ds)
        if k == 4:
            ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]

    paths = write_series(stored, edit=sagittal)
    with pytest.raises(DicomError, match="none a valid CT volume") as err:
        load_series(paths[0].parent)
    assert "differ in orientation, size or pixel spacing" in str(err.value)


def test_blanked_uids_do_not_hide_gaps_duplicates_or_truncation(write_series, stored):
    positions = [(0, 0, z) for z in (0, 2.5, 5, 10, 12.5, 15)]  # 7.5 mm missing
    gap = write_series(stored, positions=positions, edit=_anonymise)
    with pytest.raises(DicomError, match="uneven slice spacing"):
        load_series(gap[0].parent)

    positions = [(0, 0, z) for z in (0, 2.5, 5, 5, 7.5, 10)]
    twice = write_series(stored, positions=positions, edit=_anonymise)
    with pytest.raises(DicomError, match="duplicate slice position"):
        load_series(twice[0].parent)

    cut = write_series(stored, edit=_anonymise)
    cut[3].write_bytes(cut[3].read_bytes()[:-40])
    with pytest.raises(DicomError, match=f"{cut[3].name}: truncated pixel data"):
        load_series(cut[0].parent)


def _secondary_capture(path, stored):
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(path.with_name("dose_report.dcm"))


def test_automatic_choice_skips_localizers_derived_secondary_and_non_ct(write_series, stored,
                                                                       tmp_path, caplog):
    folder = tmp_path / "study"
    ct = write_series(stored, folder / "ct", series_uid="1.2.3.1")
    many = np.concatenate([stored, stored])
    write_series(many, folder / "mip", series_uid="1.2.3.2",
                 edit=lambda k, ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY", "MIP"]))
    write_series(many, folder / "mr", series_uid="1.2.3.3",
                 edit=lambda k, ds: setattr(ds, "Modality", "MR"))
    write_series(many[:1], folder / "scout", series_uid="1.2.3.4",
                 edit=lambda k, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    _secondary_capture(ct[0], stored)
    with caplog.at_level(logging.INFO, logger="ctseg.io"):
        assert load_series(folder).files == ct
    assert "localizer (scout) image" in caplog.text and "Secondary Capture object" in caplog.text
    assert "6 images, spacing (z,y,x) 2.5x0.75x0.8 mm" in caplog.text  # what was read, logged
    found = {info.uid: info for info in scan_series(folder)}
    assert set(found) == {"1.2.3.1", "1.2.3.2", "1.2.3.3"}
    assert found["1.2.3.2"].problem == "derived or secondary images (ImageType)"
    assert found["1.2.3.3"].problem == "modality MR, not CT"
    assert load_series(folder, series="1.2.3.2").shape[0] == 12  # chosen explicitly: read


def test_series_command_lists_without_identifiers(write_series, stored, tmp_path, capsys):
    folder = tmp_path / "study"
    write_series(stored, folder / "ct", series_uid="1.2.3.20200101.1")
    write_series(stored[:3], folder / "mr", series_uid="1.2.3.20200101.2",
                 edit=lambda k, ds: setattr(ds, "Modality", "MR"))
    assert main(["series", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "20200101" not in out
    lines = out.splitlines()
    assert len(lines) == 3 and "usable" in lines[0]
    assert mask_uid("1.2.3.20200101.1") in out and "yes" in lines[1] and "2.5,0.75,0.8" in lines[1]
    assert "no" in lines[2] and "modality MR, not CT" in lines[2]


def test_convert_and_predict_take_series_by_index(write_series, stored, tmp_path):
    folder = tmp_path / "study"
    write_series(stored, folder / "a", series_uid="1.2.3.1")
    b = write_series(stored + 9, folder / "b", series_uid="1.2.3.2")
    out = tmp_path / "b.nii.gz"
    assert main(["convert", str(folder), str(out), "--series", "2"]) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))),
                                  load_series(b[0].parent).array)
    args = build_parser().parse_args(["predict", "--model", "m", "--input", "i", "--output", "o",
                                      "--series", "2"])
    assert args.series == "2"


def test_error_messages_mask_series_uids(write_series, stored):
    uid = "1.2.826.0.1.20240131093000.7"
    paths = write_series(stored, series_uid=uid,
                         edit=lambda k, ds: setattr(ds, "Modality", "MR" if k == 2 else "CT"))
    with pytest.raises(DicomError, match="mixed modalities") as err:
        load_series(paths[0].parent)
    assert uid not in str(err.value) and mask_uid(uid) in str(err.value)


def test_a_larger_broken_series_is_skipped_with_a_warning(write_series, stored, tmp_path, caplog):
    folder = tmp_path / "study"
    small = write_series(stored[:4], folder / "small", series_uid="1.2.3.1")
    big = np.concatenate([stored, stored])
    positions = [(0, 0, 2.5 * k + (5 if k > 6 else 0)) for k in range(len(big))]  # a gap
    write_series(big, folder / "big", series_uid="1.2.3.2", positions=positions)
    with caplog.at_level(logging.WARNING, logger="ctseg.io"):
        assert load_series(folder).files == small
    assert "not reading the larger series" in caplog.text and "uneven slice spacing" in caplog.text
    with pytest.raises(DicomError, match="uneven slice spacing"):
        load_series(folder, series="1.2.3.2")
