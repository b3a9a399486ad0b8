"""Property-based fuzzing of `load_series` with hypothesis.

Small real series are written with pydicom, then their header fields (positions, orientation,
spacing, size, rescale, bits, transfer syntax) or their bytes are mutated. Whatever happens,
the loader must end in ctseg's own error type or in a volume that is right: finite, correctly
ordered along the slice normal, and slice for slice equal to what pydicom decodes from the
files it names. Harmless mutations (fields the loader does not need, the preamble's bytes) must
load, and give the unmutated volume. Examples are bounded and derandomised (the suite stays
reproducible) and each has a deadline, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import math
import struct
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ct_slice
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         generate_uid)
from scipy.spatial.transform import Rotation

from ctseg.errors import CTSegError
from ctseg.io import load_series

SLICES, ROWS, COLS = 5, 6, 6
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on mutated files
FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

finite = st.floats(-1e4, 1e4, allow_nan=False)
any_float = st.one_of(finite, st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([0.0, -0.0, 1e-30, 1e30, 1e308]))


def _stored(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2000, size=(SLICES, ROWS, COLS)).astype(np.int16)


def _datasets(stored, orientation, origin, spacing, pixel_spacing) -> list[pydicom.Dataset]:
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    uid = generate_uid()
    datasets = []
    for k, plane in enumerate(stored):
        ds = ct_slice(plane, None, orientation=None, pixel_spacing=pixel_spacing, series_uid=uid,
                      instance=k + 1)
        # 9 significant digits (a DS holds 16 characters): rounding stays far below tolerances
        ds.ImagePositionPatient = [f"{v:.9g}" for v in np.asarray(origin) + k * spacing * normal]
        ds.ImageOrientationPatient = [f"{v:.9g}" for v in orientation]
        ds["PixelData"].VR = "OW"  # explicit, so pydicom can write it whatever the Bits* say
        datasets.append(ds)
    return datasets


def _write(datasets, folder: Path, names) -> list[Path]:
    paths = []
    for ds, name in zip(datasets, names):
        path = folder / f"f{name:02d}.dcm"
        with pydicom.config.disable_value_validation():
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _pydicom_hu(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """pydicom's reading of a file: HU (float64 modality LUT) and its position along the normal,
    with the loader's documented defaults for optional or guessable elements."""
    ds = pydicom.dcmread(path, force=True)
    ds.setdefault("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
    ds.setdefault("SamplesPerPixel", 1)
    ds.setdefault("BitsStored", ds.BitsAllocated)
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    o = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    position = [float(v) for v in ds.get("ImagePositionPatient") or [np.nan] * 3]
    key = np.dot(position, np.cross(o[:3], o[3:]))
    return apply_modality_lut(ds.pixel_array, ds), key


def _check_unharmed(folder: Path, paths: list[Path], stored: np.ndarray) -> None:
    """A harmless mutation: the loader must not refuse, and must give the unmutated volume."""
    volume = load_series(folder)
    event("harmless: loaded")
    assert volume.files == paths
    np.testing.assert_array_equal(volume.array, stored - 1024.0)


def _check(folder: Path, original: dict[Path, tuple[np.ndarray, float]] | None = None) -> None:
    """The loader refuses with a CTSegError, or returns a finite, correctly ordered volume whose
    every slice is what pydicom reads from the file it names (or, for a file pydicom cannot
    read after a byte mutation, that file's original slice: the mutation hit bytes the loader
    does not use)."""
    try:
        volume = load_series(folder)
    except CTSegError as exc:
        event(f"refused: {str(exc).split(': ')[-1][:40]}")
        return
    event("loaded")
    assert np.isfinite(volume.array).all()
    assert np.isfinite(volume.affine).all() and abs(np.linalg.det(volume.affine[:3, :3])) > 0
    assert all(np.isfinite(s) and s > 0 for s in volume.spacing)
    keys = []
    for k, path in enumerate(volume.files):
        candidates = [original[path]] if original and path in original else []
        try:
            candidates.insert(0, _pydicom_hu(path))
        except Exception:
            assert candidates, f"{path}: loaded, but pydicom cannot read it"
        assert any(np.allclose(volume.array[k], hu, rtol=1e-6, atol=1e-3) for hu, _ in candidates), \
            f"{path}: slice {k} differs from {[hu[0, :3] for hu, _ in candidates]}"
        keys.append([key for hu, key in candidates
                     if np.allclose(volume.array[k], hu, rtol=1e-6, atol=1e-3)][0])
    if volume.metadata["order_key"] == "ImagePositionPatient":
        assert np.all(np.diff(keys) > 0), keys


# --------------------------------------------------------------------------- valid geometry

@FUZZ
@given(seed=st.integers(0, 2**16), rotation=st.integers(0, 2**16),
       origin=st.tuples(finite, finite, finite), spacing=st.floats(0.3, 20),
       pixel_spacing=st.tuples(st.floats(0.05, 5), st.floats(0.05, 5)),
       names=st.permutations(range(SLICES)))
def test_any_orientation_and_file_order_gives_the_ordered_volume(seed, rotation, origin, spacing,
                                                                 pixel_spacing, names):
    stored = _stored(seed)
    matrix = Rotation.random(random_state=rotation).as_matrix()
    orientation = tuple(np.concatenate([matrix[:, 0], matrix[:, 1]]))
    datasets = _datasets(stored, orientation, origin, spacing, pixel_spacing)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(datasets, Path(tmp), names)
        volume = load_series(tmp)
        assert volume.files == paths
        np.testing.assert_array_equal(volume.array, stored - 1024.0)
        assert volume.spacing[0] == pytest.approx(spacing, rel=1e-3)
        _check(Path(tmp))


# --------------------------------------------------------------------------- header fields

def _ds_text(values) -> str:
    return "\\".join(f"{v:.6g}" for v in values)


FIELDS = {
    "ImagePositionPatient": st.lists(any_float, min_size=1, max_size=4).map(_ds_text),
    "ImageOrientationPatient": st.one_of(
        st.lists(any_float, min_size=5, max_size=7).map(_ds_text),
        st.sampled_from(["0\\1\\0\\0\\0\\-1", "1\\0\\0\\0\\0\\-1", "1\\0\\0\\0\\1\\0"])),
    "PixelSpacing": st.lists(any_float, min_size=1, max_size=3).map(_ds_text),
    "SliceLocation": any_float.map(lambda v: f"{v:.6g}"),
    "InstanceNumber": st.integers(-5, 10).map(str),
    "Rows": st.integers(0, 65535),
    "Columns": st.integers(0, 65535),
    "RescaleSlope": any_float.map(lambda v: f"{v:.6g}"),
    "RescaleIntercept": any_float.map(lambda v: f"{v:.6g}"),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 32, 64]),
    "BitsStored": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 2),
    "SamplesPerPixel": st.integers(0, 4),
    "NumberOfFrames": st.integers(-1, 3).map(str),
    "Modality": st.sampled_from(["CT", "MR", "", "OT"]),
    # what anonymisers do: UIDs present but empty (the SOP class then comes from the file meta)
    "SeriesInstanceUID": st.sampled_from(["", "1.2.826.0.1.3680043.8.498.99"]),
    "SOPClassUID": st.sampled_from(["", "1.2.840.10008.5.1.4.1.1.7"]),
    "SeriesDescription": st.sampled_from(["", "LUNG", "SOFT"]),
    "TransferSyntaxUID": st.sampled_from([
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99", "1.2.3.4", ""]),
}

mutation = st.tuples(st.sampled_from(sorted(FIELDS)), st.one_of(st.none(), st.integers(0, SLICES - 1)),
                     st.booleans()).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), FIELDS[t[0]]))


def _harmless(mutations, datasets) -> bool:
    """Only fields the loader does not need once ImagePositionPatient orders the slices:
    InstanceNumber, a finite SliceLocation (a non-finite one is refused on purpose), and a
    Modality that is still the same on every slice (other than CT: only a warning)."""
    if any(keyword not in ("InstanceNumber", "SliceLocation", "Modality") for keyword, *_ in mutations):
        return False
    locations = [float(ds.SliceLocation) for ds in datasets if "SliceLocation" in ds]
    return (all(math.isfinite(v) for v in locations)
            and len({ds.get("Modality") for ds in datasets}) == 1)


def _set_syntax(data: bytes, uid: str) -> bytes:
    """Rewrite the file meta's TransferSyntaxUID without re-encoding the dataset (and fix the
    meta group length), so the bytes no longer match what the header says they are."""
    at = data.index(b"\x02\x00\x10\x00UI")
    old_length = struct.unpack_from("<H", data, at + 6)[0]
    value = uid.encode() + (b"\0" if len(uid) % 2 else b"")
    data = data[:at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + old_length:]
    group = data.index(b"\x02\x00\x00\x00UL")
    length = struct.unpack_from("<I", data, group + 8)[0] + len(value) - old_length
    return data[:group + 8] + struct.pack("<I", length) + data[group + 12:]


@FUZZ
@given(seed=st.integers(0, 2**16), mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_header_fields_are_refused_or_loaded_correctly(seed, mutations):
    """Each mutation sets (or deletes) a field in one slice (or all), then the loader runs."""
    stored = _stored(seed)
    datasets = _datasets(stored, (1, 0, 0, 0, 1, 0), (-10.0, 5.0, -40.0), 2.5, (0.7, 0.7))
    syntaxes = {}
    for keyword, index, delete, value in mutations:
        targets = range(SLICES) if index is None else [index]
        for k in targets:
            if keyword == "TransferSyntaxUID":
                syntaxes[k] = value
            elif delete and keyword in datasets[k]:
                delattr(datasets[k], keyword)
            else:
                with pydicom.config.disable_value_validation():
                    setattr(datasets[k], keyword, value)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(datasets, Path(tmp), range(SLICES))
        for k, uid in syntaxes.items():
            paths[k].write_bytes(_set_syntax(paths[k].read_bytes(), uid))
        if _harmless(mutations, datasets):
            _check_unharmed(Path(tmp), paths, stored)
        _check(Path(tmp))


# --------------------------------------------------------------------------- bytes

@FUZZ
@given(seed=st.integers(0, 2**16), index=st.integers(0, SLICES - 1),
       edits=st.lists(st.tuples(st.sampled_from(["truncate", "overwrite", "insert"]),
                                st.integers(0, 2000), st.binary(min_size=1, max_size=8)),
                      min_size=1, max_size=3))
def test_mutated_bytes_are_refused_or_loaded_correctly(seed, index, edits):
    stored = _stored(seed)
    datasets = _datasets(stored, (1, 0, 0, 0, 1, 0), (0.0, 0.0, 0.0), 3.0, (0.8, 0.8))
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write(datasets, Path(tmp), range(SLICES))
        original = {path: _pydicom_hu(path) for path in paths}
        data = paths[index].read_bytes()
        preamble_only = True  # the 128-byte preamble is free for applications: changes nothing
        for op, offset, payload in edits:
            offset %= len(data) + 1
            preamble_only &= op == "overwrite" and offset + len(payload) <= 128
            if op == "truncate":
                data = data[:offset]
            elif op == "overwrite":
                data = data[:offset] + payload + data[offset + len(payload):]
            else:
                data = data[:offset] + payload + data[offset:]
        paths[index].write_bytes(data)
        if preamble_only:
            _check_unharmed(Path(tmp), paths, stored)
        _check(Path(tmp), original)


HARMLESS = {
    "InstanceNumber": FIELDS["InstanceNumber"],
    "SliceLocation": finite.map(lambda v: f"{v:.6g}"),
}


@settings(FUZZ, max_examples=40)
@given(seed=st.integers(0, 2**16), modality=st.sampled_from(["CT", "MR", "OT"]),
       mutations=st.lists(st.tuples(st.sampled_from(sorted(HARMLESS)), st.integers(0, SLICES - 1),
                                    st.booleans()).flatmap(
           lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), HARMLESS[t[0]])),
           min_size=1, max_size=4))
def test_harmless_header_mutations_load_the_unmutated_volume(seed, modality, mutations):
    """Fields the loader does not need once ImagePositionPatient orders the slices, changed or
    deleted slice by slice (and one Modality for all): never a refusal, always the same volume."""
    stored = _stored(seed)
    datasets = _datasets(stored, (1, 0, 0, 0, 1, 0), (-10.0, 5.0, -40.0), 2.5, (0.7, 0.7))
    for ds in datasets:
        ds.Modality = modality
    for keyword, k, delete, value in mutations:
        if delete and keyword in datasets[k]:
            delattr(datasets[k], keyword)
        else:
            setattr(datasets[k], keyword, value)
    with tempfile.TemporaryDirectory() as tmp:
        _check_unharmed(Path(tmp), _write(datasets, Path(tmp), range(SLICES)), stored)
