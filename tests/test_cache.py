"""The preprocessing cache: exact HU and masks, read once, reused, invalidated by real changes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import ctseg.io.formats
from ctseg.data import Case, discover_cases
from ctseg.data.cache import cache_case
from ctseg.io import load_mask, load_series

CONFIG = {"data": {"size": [32, 32], "window": [-1000, 400]}}


@pytest.fixture
def reads(monkeypatch):
    """Count DICOM series reads (a pass-through spy on the `load_series` that `ctseg.io.load_image`,
    the cache's reader, calls)."""
    calls = []
    real = ctseg.io.formats.load_series

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ctseg.io.formats, "load_series", counting)
    return calls


def test_entry_matches_the_source_exactly(phantom_dir, tmp_path, reads):
    case = discover_cases(phantom_dir)[0]
    cached = cache_case(case, CONFIG, tmp_path)
    volume = load_series(case.image)
    assert not cached.hit and len(reads) == 1
    np.testing.assert_array_equal(np.asarray(cached.hu, dtype=np.float32), volume.array)
    np.testing.assert_array_equal(cached.label, load_mask(case.label, volume))
    np.testing.assert_allclose(cached.affine, volume.affine)
    assert cached.spacing == pytest.approx(volume.spacing)
    assert cached.shape == volume.shape
    assert cached.train_image.shape == (volume.shape[0], 32, 32)
    assert cached.train_label.shape == (volume.shape[0], 1, 32, 32)  # soft foreground channel
    assert 0.0 <= float(cached.train_label.min()) and float(cached.train_label.max()) <= 1.0
    fraction = float(np.mean(cached.train_label, dtype=np.float64))
    assert fraction == pytest.approx(float(np.mean(cached.label)), rel=0.03)
    assert 0.0 <= float(cached.train_image.min()) and float(cached.train_image.max()) <= 1.0
    np.testing.assert_array_equal(cached.foreground, cached.label.reshape(len(cached.foreground), -1).any(1))
    assert cached.label_values == (0, 1)
    # no identifier from the DICOM header in the cache's metadata
    meta = (cached.path / "meta.json").read_text()
    assert "PatientName" not in meta and "Phantom" not in meta


def test_second_use_reads_no_dicom_and_new_settings_reuse_the_hu(phantom_dir, tmp_path, reads):
    case = discover_cases(phantom_dir)[1]
    first = cache_case(case, CONFIG, tmp_path)
    assert len(reads) == 1
    again = cache_case(case, CONFIG, tmp_path)
    assert again.hit and again.path == first.path and again.train_path == first.train_path
    other = cache_case(case, {"data": {"size": [24, 24], "window": [-500, 500]}}, tmp_path)
    assert len(reads) == 1  # a new window and size are derived from the cached HU, not from DICOM
    assert other.hit and other.path == first.path and other.train_path != first.train_path
    assert other.train_image.shape[1:] == (24, 24)


def test_a_changed_source_file_invalidates_the_entry(phantom_dir, tmp_path, reads):
    source = discover_cases(phantom_dir)[2]
    shutil.copytree(source.image, tmp_path / "copy" / source.name)  # never touch the shared fixture
    case = Case(source.name, tmp_path / "copy" / source.name, source.label)
    first = cache_case(case, CONFIG, tmp_path / "cache")
    some_file = sorted(case.image.iterdir())[0]
    st = some_file.stat()
    os.utime(some_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = cache_case(case, CONFIG, tmp_path / "cache")
    assert not second.hit and second.path != first.path and len(reads) == 2
