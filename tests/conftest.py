"""Shared fixtures: a tiny phantom dataset for everyone, and a writer of hand-made DICOM series.

`CTSEG_TEST_THREADS` (torch intra-op threads, default: torch's own) and `CTSEG_TEST_SEED` (the
global torch/numpy/random seed set before every test, default 0) let CI run the suite under other
reduction orders and initialisations, so an assert that only holds by floating-point luck fails
there instead of on someone else's machine. Both are printed in the pytest header.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ctseg.data.phantom import write_phantom_dataset

PHANTOM_SHAPE = (16, 64, 64)  # slices, rows, cols of the shared phantom
TEST_SEED = int(os.environ.get("CTSEG_TEST_SEED", "0"))
TEST_THREADS = os.environ.get("CTSEG_TEST_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    if TEST_THREADS:  # also for the subprocesses tests start (CLI runs, torchrun)
        torch.set_num_threads(int(TEST_THREADS))
        os.environ.setdefault("OMP_NUM_THREADS", TEST_THREADS)


def pytest_report_header(config: pytest.Config) -> str:
    return (f"ctseg: torch threads {torch.get_num_threads()} (CTSEG_TEST_THREADS="
            f"{TEST_THREADS or 'unset'}), seed {TEST_SEED} (CTSEG_TEST_SEED)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark slow the long end-to-end tests of files that do not carry the mark themselves yet
    (`--durations`, 2026-12-02: a trained and exported bundle, 55 s to set up on the loaded
    2-core dev container, and `monai.bundle run` 40 s; each experiment smoke run up to 58 s), so
    `make test-fast` stays short. Move these into the files as `@pytest.mark.slow` when convenient."""
    for item in items:
        if ((item.path.name == "test_bundle.py" and "run_dir" in item.fixturenames)
                or (item.path.name == "test_experiments.py"
                    and getattr(item, "originalname", "") == "test_experiment_smoke")):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every test, and the fixtures set up for it, start from the same global RNG state,
    whatever ran before."""
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Seed layout with 3 small phantom cases (16 x 64 x 64): `Images/Phantom_00N/`, `Segmentations/`."""
    root = tmp_path_factory.mktemp("phantom")
    slices, rows, cols = PHANTOM_SHAPE
    return write_phantom_dataset(root, n_cases=3, seed=0, rows=rows, cols=cols, slices=slices)


def ct_slice(stored: np.ndarray, position, *, orientation=(1, 0, 0, 0, 1, 0),
             pixel_spacing=(0.75, 0.8), slope=1.0, intercept=-1024.0, series_uid: str,
             instance: int = 1, slice_location: float | None = None, signed: bool = True,
             bits_stored: int = 16, study_uid: str | None = None) -> Dataset:
    """A minimal but complete CT Image Storage dataset holding `stored` (rows x cols)."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.Manufacturer = "TestVendor"
    ds.ConvolutionKernel = "B30f"
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "TEST-0001"
    ds.StudyInstanceUID = study_uid or "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6g}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    if slice_location is not None:
        ds.SliceLocation = f"{slice_location:.6g}"
    ds.SliceThickness = "2.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = f"{intercept:.6g}"
    ds.RescaleSlope = f"{slope:.6g}"
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2" if signed else "<u2").tobytes()
    return ds


@pytest.fixture
def write_series(tmp_path) -> Callable[..., list[Path]]:
    """Write a CT series as real DICOM files; returns the paths in slice order (ascending z).

    `stored` is (z, y, x) stored values. Slices are placed at `origin + k * spacing * normal`
    unless `positions` is given; `per_slice` (k → dict of ct_slice overrides) varies single
    slices; `edit` (k, dataset) may change a dataset just before writing; names are shuffled.
    """
    counter = iter(range(1000))

    def write(stored: np.ndarray, folder: Path | None = None, *, spacing: float = 2.5,
              origin=(-30.0, -20.0, -50.0), orientation=(1, 0, 0, 0, 1, 0), positions=None,
              series_uid: str | None = None, per_slice: Callable[[int], dict] | None = None,
              edit: Callable[[int, Dataset], None] | None = None, **kwargs) -> list[Path]:
        folder = folder or tmp_path / f"series{next(counter)}"
        folder.mkdir(parents=True, exist_ok=True)
        series_uid = series_uid or generate_uid()
        o = np.asarray(orientation, dtype=float)
        normal = np.cross(o[:3], o[3:])
        rng = np.random.default_rng(len(stored))
        names = rng.permutation(len(stored))
        paths = []
        for k, plane in enumerate(stored):
            position = (np.asarray(origin) + k * spacing * normal) if positions is None else positions[k]
            options = dict(kwargs, orientation=orientation, series_uid=series_uid, instance=k + 1)
            options.update(per_slice(k) if per_slice else {})
            ds = ct_slice(plane, position, **options)
            if edit:
                edit(k, ds)
            path = folder / f"slice_{names[k]:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    return write
