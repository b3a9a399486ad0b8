"""Defects D4, D7, D10, D12 and D14 (DICOM parts) of the hostile-input probe, each reproduced
with real files: off-unit orientation cosines, a deflated decompression bomb, a FIFO named
`*.dcm`, mask files declaring huge shapes, control characters in file names."""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import signal
import tracemalloc
import zipfile

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ct_slice
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ctseg.cli import main
from ctseg.errors import DicomError, MaskError
from ctseg.io import load_mask, load_series
from ctseg.io.dicom_headers import MAX_IMAGE_SIDE


@pytest.fixture
def stored():
    return np.random.default_rng(17).integers(0, 2000, size=(5, 12, 10)).astype(np.int16)


def _sitk_series(folder) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture
def no_hang():
    """Fail (instead of stalling the suite) if the code under test blocks on a read."""
    def stalled(signum, frame):
        raise AssertionError("the read blocked")

    previous = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class _Peak:
    """Peak Python memory (numpy buffers included) inside the block."""

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# --------------------------------------------------------------------------- D4

def test_orientation_cosines_off_unit_length_are_normalised_like_simpleitk(write_series, stored,
                                                                          caplog):
    positions = [(-30.0, -20.0, -50.0 + 3.0 * k) for k in range(len(stored))]
    paths = write_series(stored, orientation=(1.009, 0, 0, 0, 1.009, 0), positions=positions,
                         pixel_spacing=(0.977, 0.977))
    with caplog.at_level(logging.WARNING, logger="ctseg.io"):
        volume = load_series(paths[0].parent)
    image = _sitk_series(paths[0].parent)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing()[::-1], atol=1e-6)
    np.testing.assert_allclose(volume.spacing, (3.0, 0.977, 0.977), atol=1e-6)
    # the affine's voxel axes are as long as the spacing: volumes are not 5.5 % too large
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), (0.977, 0.977, 3.0),
                               atol=1e-6)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert "off unit length by up to 0.009; normalised" in caplog.text


def test_rounding_of_orientation_cosines_is_normalised_quietly(write_series, stored, caplog):
    positions = [(-30.0, -20.0, -50.0 + 2.5 * k) for k in range(len(stored))]
    paths = write_series(stored, orientation=(1.00002, 0, 0, 0, 0.99999, 0), positions=positions)
    with caplog.at_level(logging.WARNING, logger="ctseg.io"):
        volume = load_series(paths[0].parent)
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), (0.8, 0.75, 2.5))
    assert "normalised" not in caplog.text


# --------------------------------------------------------------------------- D7

def test_deflated_decompression_bomb_is_refused_before_inflating(tmp_path):
    folder = tmp_path / "bomb"
    folder.mkdir()
    side = 8192  # 128 MiB of pixels per slice, deflated to 130 kB
    for k in range(3):
        ds = ct_slice(np.zeros((2, 2), np.int16), (0, 0, 2.5 * k), series_uid="1.2.3.4",
                      instance=k + 1)
        ds.Rows = ds.Columns = side
        ds.PixelData = bytes(side * side * 2)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    with _Peak() as peak, pytest.raises(DicomError, match=f"more than {MAX_IMAGE_SIDE} a side"):
        load_series(folder)
    assert peak.bytes < 20 * 2**20  # the header was inflated, not the 128 MiB of pixels


def test_deflated_series_still_loads(write_series, stored, tmp_path):
    def deflate(k, ds):
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    plain = write_series(stored)
    deflated = write_series(stored, edit=deflate)
    np.testing.assert_array_equal(load_series(deflated[0].parent).array,
                                  load_series(plain[0].parent).array)


# --------------------------------------------------------------------------- D10

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_named_dcm_is_skipped_with_a_note_or_refused_when_given(write_series, stored,
                                                                      tmp_path, caplog, no_hang,
                                                                      capsys):
    paths = write_series(stored)
    fifo = paths[0].parent / "x.dcm"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it for reading would block forever
    with caplog.at_level(logging.INFO, logger="ctseg.io"):
        assert load_series(paths[0].parent).files == paths
    assert "x.dcm (a FIFO)" in caplog.text
    with pytest.raises(DicomError, match=r"x.dcm: not a regular file \(a FIFO\)"):
        load_series(fifo)
    assert main(["convert", str(fifo), str(tmp_path / "out.nii.gz")]) == 2
    assert "not a regular file" in capsys.readouterr().err


# --------------------------------------------------------------------------- D12

def _volume(write_series, stored):
    return load_series(write_series(stored)[0].parent)


def test_npz_mask_declaring_a_huge_shape_is_refused_before_allocating(write_series, stored,
                                                                     tmp_path):
    volume = _volume(write_series, stored)
    path = tmp_path / "case_seg.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("masks.npy", "w") as member:  # a 0.6 GB array declared, 1 MB present
            np.lib.format.write_array_header_1_0(
                member, {"descr": "|u1", "fortran_order": False, "shape": (2400, 512, 512)})
            member.write(bytes(2**20))
    assert path.stat().st_size < 100_000
    with _Peak() as peak, pytest.raises(MaskError, match=r"mask shape \(2400, 512, 512\)"):
        load_mask(path, volume)
    assert peak.bytes < 20 * 2**20


def test_nifti_mask_declaring_a_huge_shape_is_refused_before_allocating(write_series, stored,
                                                                       tmp_path):
    volume = _volume(write_series, stored)
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 2400))
    header.set_data_dtype(np.uint8)
    header.set_qform(volume.affine, code=1)
    path = tmp_path / "mask.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + bytes(4) + bytes(2**20)))
    with _Peak() as peak, pytest.raises(MaskError, match=r"mask shape \(2400, 512, 512\)"):
        load_mask(path, volume)
    assert peak.bytes < 20 * 2**20


def test_masks_that_fit_still_load(write_series, stored, tmp_path):
    volume = _volume(write_series, stored)
    labels = (volume.array > -500).astype(np.uint8)
    np.savez_compressed(tmp_path / "a_seg.npz", masks=labels)
    np.testing.assert_array_equal(load_mask(tmp_path / "a_seg.npz", volume), labels)
    image = nib.Nifti1Image(labels.transpose(2, 1, 0), volume.affine)
    nib.save(image, tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(load_mask(tmp_path / "mask.nii.gz", volume), labels)


# --------------------------------------------------------------------------- D14

def test_control_characters_in_file_names_are_escaped(write_series, stored, tmp_path, caplog):
    paths = write_series(stored)
    forged = paths[0].parent / "x\nERROR ctseg: forged line.dcm"
    forged.write_bytes(b"this is not DICOM")
    with pytest.raises(DicomError) as err:
        load_series(paths[0].parent)
    assert "\n" not in str(err.value) and repr(str(forged)) in str(err.value)

    forged.unlink()
    note = paths[0].parent / "notes\r\nINFO forged.txt"
    note.write_text("a note beside the slices")
    with caplog.at_level(logging.INFO, logger="ctseg.io"):
        load_series(paths[0].parent)
    assert repr("notes\r\nINFO forged.txt") in caplog.text
    assert not any("\n" in r.getMessage() or "\r" in r.getMessage() for r in caplog.records)
    shutil.rmtree(paths[0].parent)


def test_case_folder_names_with_control_characters_are_escaped_in_logs(write_series, stored,
                                                                      tmp_path, caplog):
    from ctseg.data import discover_cases

    root = tmp_path / "cases"
    write_series(stored, root / "good")
    (root / "empty\nINFO ctseg: forged").mkdir()
    with caplog.at_level(logging.INFO, logger="ctseg"):
        assert [c.name for c in discover_cases(root)] == ["good"]
    assert repr("empty\nINFO ctseg: forged") in caplog.text
    assert not any("\n" in r.getMessage() for r in caplog.records)
