"""A corpus of bad and unusual inputs, each written as real files, each with the behaviour a user
expects: a `DicomError`/`MaskError` naming the file and the problem, or a correct volume and a
logged note. Inputs already covered elsewhere (truncated pixel data, duplicates, gaps, mixed
series, localizers, multi-frame, per-slice rescale, compressed syntaxes) are listed with their
tests in docs/reliability.md and not repeated here.
"""

from __future__ import annotations

import logging
import os
import shutil
import tracemalloc

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (DeflatedExplicitVRLittleEndian, EnhancedCTImageStorage,
                         ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless)

from ctseg.cli import main
from ctseg.data import discover_cases
from ctseg.errors import CTSegError, DicomError, MaskError
from ctseg.io import load_mask, load_nifti, load_series, save_nifti
from ctseg.io.dicom import scan_series
from ctseg.io.dicom_headers import MAX_IMAGE_SIDE, read_header
from ctseg.io.memory import available_memory


@pytest.fixture
def stored():
    return np.random.default_rng(11).integers(0, 2000, size=(6, 8, 8)).astype(np.int16)


def _refused(folder, *patterns, cls=DicomError):
    with pytest.raises(cls) as err:
        load_series(folder)
    for pattern in patterns:
        assert pattern in str(err.value), str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------- files

def test_zero_byte_dcm_is_refused_other_empty_files_skipped(write_series, stored, caplog):
    paths = write_series(stored)
    folder = paths[0].parent
    (folder / "LOCK").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="ctseg.io.dicom"):
        np.testing.assert_array_equal(load_series(folder).array, stored - 1024.0)
    assert "LOCK: empty file (0 bytes)" in caplog.text
    paths[5].write_bytes(b"")  # the top slice: without the refusal the volume is silently short
    _refused(folder, f"{paths[5]}: named like a DICOM file but empty file (0 bytes)")


def test_dcm_truncated_inside_the_preamble_is_refused(write_series, stored):
    paths = write_series(stored)
    paths[0].write_bytes(paths[0].read_bytes()[:100])
    _refused(paths[0].parent, f"{paths[0]}: named like a DICOM file but not a DICOM file")


def test_other_format_named_dcm_is_refused(write_series, stored, tmp_path):
    paths = write_series(stored)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "x.nii")
    shutil.copy(tmp_path / "x.nii", paths[0].parent / "IMG0007.DCM")
    _refused(paths[0].parent, "IMG0007.DCM: named like a DICOM file but not a DICOM file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_refused(write_series, stored):
    paths = write_series(stored)
    paths[2].chmod(0)
    try:
        _refused(paths[0].parent, f"{paths[2]}: cannot read file (Permission denied)")
    finally:
        paths[2].chmod(0o644)


def test_file_gone_before_it_is_read_is_refused(tmp_path):
    # The root-proof half of "unreadable": listed, then moved away by another process.
    with pytest.raises(DicomError, match="gone.dcm: cannot read file .No such file"):
        read_header(tmp_path / "gone.dcm")


def test_broken_symlink_is_refused(write_series, stored):
    paths = write_series(stored)
    link = paths[0].parent / "slice_on_share.dcm"
    link.symlink_to("/nonexistent/mount/slice.dcm")
    _refused(paths[0].parent, f"{link}: broken symbolic link")


def test_symlink_loop_between_files_is_refused(write_series, stored):
    paths = write_series(stored)
    folder = paths[0].parent
    (folder / "a.dcm").symlink_to(folder / "b.dcm")
    (folder / "b.dcm").symlink_to(folder / "a.dcm")
    _refused(folder, "symbolic link loop")


def test_folder_symlink_loop_is_read_once(write_series, stored, caplog):
    paths = write_series(stored)
    folder = paths[0].parent
    (folder / "sub").mkdir()
    (folder / "sub" / "back").symlink_to("..", target_is_directory=True)
    (folder / "again").symlink_to(folder, target_is_directory=True)
    with caplog.at_level(logging.INFO, logger="ctseg.io.dicom"):
        volume = load_series(folder)
    assert sorted(volume.files) == sorted(paths)
    np.testing.assert_array_equal(volume.array, stored - 1024.0)
    assert "symbolic link back to a folder" in caplog.text


def test_series_behind_a_folder_link_is_followed(write_series, stored, tmp_path):
    paths = write_series(stored, tmp_path / "pacs" / "series1")
    case = tmp_path / "cases" / "P1"
    case.mkdir(parents=True)
    (case / "CT").symlink_to(paths[0].parent, target_is_directory=True)
    (case / "loop").symlink_to(case, target_is_directory=True)
    np.testing.assert_array_equal(load_series(case).array, stored - 1024.0)
    assert [(c.name, c.image) for c in discover_cases(tmp_path / "cases")] == [("P1", case)]


def test_non_ascii_and_space_paths(write_series, stored, tmp_path, capsys):
    folder = tmp_path / "Patiënt Ωmega" / "série 1 (axial)"
    paths = write_series(stored, folder)
    for k, path in enumerate(paths):
        path.rename(folder / f"schnitt ä {k}.dcm")
    assert [c.name for c in discover_cases(folder.parent)] == ["série 1 (axial)"]
    out = tmp_path / "Ausgabe ü" / "vol ume.nii.gz"
    assert main(["convert", str(folder), str(out)]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj).transpose(2, 1, 0),
                                  stored - 1024)


# --------------------------------------------------------------------------- headers

def test_no_position_no_location_no_instance_number_is_refused(write_series, stored):
    def anonymous(k, ds):
        del ds.ImagePositionPatient, ds.InstanceNumber

    paths = write_series(stored, edit=anonymous)
    _refused(paths[0].parent, "neither ImagePositionPatient, SliceLocation nor InstanceNumber")


def test_mr_among_ct(write_series, stored, tmp_path):
    folder = tmp_path / "study"
    ct = write_series(stored, folder / "ct", series_uid="1.2.3.1")
    write_series(stored[:3], folder / "mr", series_uid="1.2.3.2",
                 edit=lambda k, ds: setattr(ds, "Modality", "MR"))
    assert load_series(folder).files == ct  # the MR series is listed, never chosen
    mr = [info for info in scan_series(folder) if info.modality == "MR"]
    assert len(mr) == 1 and mr[0].problem == "modality MR, not CT"
    assert load_series(folder, series="1.2.3.1").files == ct
    paths = write_series(stored, edit=lambda k, ds: setattr(ds, "Modality", "MR" if k == 2 else "CT"))
    _refused(paths[0].parent, "mixed modalities", f"{paths[2]} is MR")


def test_unflagged_localizer_in_the_series_is_refused(write_series, stored):
    def sagittal(k, ds):
        if k == 4:  # a scout without LOCALIZER in ImageType but in the same series
            ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]

    paths = write_series(stored, edit=sagittal)
    _refused(paths[0].parent, "inconsistent ImageOrientationPatient", paths[4].name)


def test_gantry_tilt_tag_warns(write_series, stored, caplog):
    paths = write_series(stored, edit=lambda k, ds: setattr(ds, "GantryDetectorTilt", "15"))
    with caplog.at_level(logging.WARNING, logger="ctseg.io.dicom"):
        load_series(paths[0].parent)
    assert "gantry tilt of 15.00 degrees" in caplog.text


@pytest.mark.parametrize("slope, intercept, message", [
    ("NaN", "-1024", "RescaleSlope is NaN"),
    ("1", "inf", "RescaleIntercept is inf"),
    ("0", "-1024", "RescaleSlope is 0"),
    ("1e30", "0", "not plausible HU"),
    ("1", "1e9", "not plausible HU"),
    ("1", "-40000", "not plausible HU"),
])
def test_nan_zero_or_absurd_rescale_is_refused(write_series, stored, slope, intercept, message):
    def rescale(k, ds):
        if k == 3:
            ds["RescaleSlope"].value, ds["RescaleIntercept"].value = slope, intercept

    with pydicom.config.disable_value_validation():
        paths = write_series(stored, edit=rescale)
    _refused(paths[0].parent, str(paths[3]), message)


@pytest.mark.parametrize("keyword, value, message", [
    ("ImagePositionPatient", ["0", "0", "nan"], "ImagePositionPatient ['0', '0', 'nan'] is not finite"),
    ("SliceLocation", "inf", "SliceLocation is inf"),
    ("PixelSpacing", ["0", "0.7"], "PixelSpacing [0.0, 0.7] is not positive"),
    ("PixelSpacing", ["-0.7", "0.7"], "is not positive"),
    ("ImageOrientationPatient", ["0"] * 6, "is not two orthogonal unit vectors"),
    ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"], "orthogonal unit vectors"),
    ("BitsAllocated", 12, "BitsAllocated 12 is not supported"),
    ("SamplesPerPixel", 3, "3 samples per pixel"),
])
def test_impossible_header_values_are_refused(write_series, stored, keyword, value, message):
    def broken(k, ds):
        if k == 1:
            ds[keyword].value = value

    with pydicom.config.disable_value_validation():
        paths = write_series(stored, edit=broken, slice_location=0.0)
    _refused(paths[0].parent, str(paths[1]), message)


@pytest.mark.parametrize("keyword, message", [
    ("RescaleSlope", "only RescaleIntercept is present"),
    ("PixelRepresentation", "PixelRepresentation missing"),
    ("BitsAllocated", "BitsAllocated or PixelRepresentation missing"),
])
def test_missing_pixel_description_is_refused_not_guessed(write_series, stored, keyword, message):
    def drop(k, ds):
        if k == 2:
            ds["PixelData"].VR = "OW"  # so pydicom can still write it
            delattr(ds, keyword)

    paths = write_series(stored, edit=drop)
    _refused(paths[0].parent, str(paths[2]), message)


def test_declared_size_beyond_the_file_is_refused_before_allocating(write_series, stored):
    def huge(k, ds):
        if k == 0:
            ds.Rows, ds.Columns = 4000, 4000  # 32 MB of pixels declared, 128 bytes present

    paths = write_series(stored, edit=huge)
    tracemalloc.start()
    try:
        _refused(paths[0].parent, str(paths[0]), "truncated pixel data (128 of 32000000 bytes)")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_absurd_declared_size_of_compressed_slices_is_refused(write_series, stored):
    def huge(k, ds):
        ds.compress(RLELossless)
        if k == 2:
            ds.Rows = ds.Columns = MAX_IMAGE_SIDE + 1

    paths = write_series(stored, edit=huge)
    _refused(paths[0].parent, str(paths[2]), f"more than {MAX_IMAGE_SIDE} a side")


def test_series_larger_than_memory_is_refused_before_allocating(write_series):
    side = MAX_IMAGE_SIDE  # 64 MiB of float32 per slice once decoded
    memory = available_memory()  # not total RAM: what other processes leave
    n = int(memory * 1.25) // (side * side * 4) + 1
    if n > 600:
        pytest.skip(f"{memory / 2**30:.0f} GiB of memory available: too many files to write")

    def declare(k, ds):
        ds.compress(RLELossless)
        ds.Rows = ds.Columns = side

    paths = write_series(np.zeros((n, 2, 2), np.int16), edit=declare)
    tracemalloc.start()
    try:
        _refused(paths[0].parent, "GiB, more than the", "GiB of memory available now")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_pixel_data_longer_than_declared_is_refused(write_series, stored):
    def double(k, ds):
        if k == 4:
            ds.PixelData = ds.PixelData * 2  # 16 rows stored, 8 declared: which 8?

    paths = write_series(stored, edit=double)
    _refused(paths[0].parent, str(paths[4]), "pixel data holds 256 bytes", "need 128")


@pytest.mark.parametrize("frames", [1, 3])
def test_enhanced_ct_is_refused_clearly(write_series, stored, frames):
    def enhanced(k, ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
        ds.NumberOfFrames = frames
        ds.PixelData = ds.PixelData * frames
        del ds.ImagePositionPatient, ds.PixelSpacing  # per-frame functional groups hold these

    paths = write_series(stored[:1], edit=enhanced)
    _refused(paths[0].parent, str(paths[0]), "Enhanced CT Image Storage (multi-frame",
             "one CT image file per slice")


def test_mixed_transfer_syntaxes_in_one_series(write_series):
    stored = np.random.default_rng(3).integers(0, 2000, size=(5, 32, 32)).astype(np.int16)

    def encode(k, ds):
        if k == 1:
            ds.compress(RLELossless)
        elif k == 2:
            ds.compress(JPEG2000Lossless)
        elif k == 3:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif k == 4:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    paths = write_series(stored, edit=encode)
    volume = load_series(paths[0].parent)
    np.testing.assert_array_equal(volume.array, stored - 1024.0)
    assert volume.files == paths


def test_corrupt_compressed_frame_is_refused(write_series, stored):
    def corrupt(k, ds):
        ds.compress(RLELossless)
        if k == 3:
            ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60])

    paths = write_series(stored, edit=corrupt)
    _refused(paths[0].parent, str(paths[3]), "cannot decode pixel data")


def test_single_slice_uses_header_thickness(write_series, stored):
    paths = write_series(stored[:1])
    volume = load_series(paths[0])
    assert volume.shape == (1, 8, 8) and volume.spacing[0] == pytest.approx(2.5)


def test_utf8_character_set_and_non_ascii_names_load(write_series, stored):
    def charset(k, ds):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 names: never decoded by the loader
        ds.PatientName = "山田^太郎"

    paths = write_series(stored, edit=charset)
    np.testing.assert_array_equal(load_series(paths[0].parent).array, stored - 1024.0)


# --------------------------------------------------------------------------- NIfTI images

def test_nifti_image_with_nan_voxels_or_no_geometry_is_refused(tmp_path):
    data = np.full((8, 8, 4), -1000, np.float32)
    data[0, 0, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1])), tmp_path / "nan.nii.gz")
    with pytest.raises(CTSegError, match="nan.nii.gz: 1 voxels are NaN or infinite"):
        load_nifti(tmp_path / "nan.nii.gz")
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 4))
    header.set_sform(np.diag([0.8, 0.8, 2.5, 1]), code=1)
    header["srow_z"] = [0, 0, 0, 0]  # an sform that squashes every slice onto one plane
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), None, header=header), tmp_path / "flat.nii.gz")
    with pytest.raises(CTSegError, match="flat.nii.gz: the affine .* does not place voxels"):
        load_nifti(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(CTSegError, match="4d.nii.gz: expected a 3D image"):
        load_nifti(tmp_path / "4d.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "4d.nii.gz").read_bytes()[:50])
    with pytest.raises(CTSegError, match="cut.nii.gz: unreadable NIfTI file"):
        load_nifti(tmp_path / "cut.nii.gz")


# --------------------------------------------------------------------------- masks

@pytest.fixture
def volume(write_series, stored):
    return load_series(write_series(stored)[0].parent)


def test_nifti_mask_of_another_shape_is_refused(volume, tmp_path):
    save_nifti(np.zeros((6, 8, 7), np.uint8), volume.affine, tmp_path / "m.nii.gz")
    with pytest.raises(MaskError, match=r"m.nii.gz: mask shape \(6, 8, 7\) .* volume \(6, 8, 8\)"):
        load_mask(tmp_path / "m.nii.gz", volume)


@pytest.mark.parametrize("values, message", [
    (np.full((8, 8, 6), 300, np.int16), "values 300..300 are not labels in 0..255"),
    (np.full((8, 8, 6), 0.5, np.float32), "non-integer values"),
    (np.full((8, 8, 6), np.nan, np.float32), "non-integer values"),
])
def test_nifti_mask_with_impossible_labels_is_refused(volume, tmp_path, values, message):
    image = nib.Nifti1Image(values, volume.affine)
    nib.save(image, tmp_path / "m.nii.gz")
    with pytest.raises(MaskError, match=message):
        load_mask(tmp_path / "m.nii.gz", volume)


def test_mask_that_is_not_a_3d_label_map_is_refused(volume, tmp_path):
    np.savez(tmp_path / "flat_seg.npz", masks=np.zeros((8, 8), np.uint8))
    with pytest.raises(MaskError, match=r"flat_seg.npz: 'masks' has shape \(8, 8\)"):
        load_mask(tmp_path / "flat_seg.npz", volume)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6, 2), np.uint8), volume.affine), tmp_path / "4d.nii.gz")
    with pytest.raises(MaskError, match=r"4d.nii.gz: expected a 3D label map"):
        load_mask(tmp_path / "4d.nii.gz", volume)
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "4d.nii.gz").read_bytes()[:60])
    with pytest.raises(MaskError, match="cut.nii.gz: unreadable NIfTI mask"):
        load_mask(tmp_path / "cut.nii.gz", volume)


def test_boolean_mask_is_accepted(volume, tmp_path):
    truth = np.zeros(volume.shape, bool)
    truth[2:4, 2:6, 3:5] = True
    np.savez(tmp_path / "b_seg.npz", masks=truth)
    np.testing.assert_array_equal(load_mask(tmp_path / "b_seg.npz", volume), truth.astype(np.uint8))


def test_mask_labels_beyond_the_configured_classes_are_refused_before_training(volume, tmp_path):
    from ctseg.train import train

    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a", "b", "c"):
        labels = np.zeros(volume.shape, np.uint8)
        labels[1:4, 2:6, 2:6] = 2 if name == "b" else 1  # lungs as 2: a left/right label map
        save_nifti(volume.array, volume.affine, cases / f"{name}.nii.gz")
        save_nifti(labels, volume.affine, cases / f"{name}_seg.nii.gz")
    config = {"data": {"size": [8, 8], "num_classes": 2, "cache_dir": str(tmp_path / "cache")},
              "model": {"features": [4, 8]}, "tracking": {"enabled": False}}
    with pytest.raises(MaskError, match=r"case b: mask holds labels \[0, 2\] but data.num_classes=2"):
        train(config, cases, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()
