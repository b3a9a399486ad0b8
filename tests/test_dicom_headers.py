"""The fast header scanner against pydicom, the reference, on every file pydicom ships."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from ctseg.errors import DicomError
from ctseg.io import dicom_headers as headers

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
WITH_PREAMBLE = sorted(p for p in TEST_FILES.rglob("*")
                       if p.is_file() and p.read_bytes()[128:132] == b"DICM")


def _compare(path: Path) -> None:
    data = path.read_bytes()
    try:
        fast = headers.scan_header(data, len(data))
    except headers._UsePydicom:
        return  # deflate, missing transfer syntax, malformed VRs: pydicom's job anyway
    with open(path, "rb") as fp:
        slow = headers.pydicom_header(fp)
    for keyword in headers.HEADER_KEYWORDS:
        assert headers._Values(fast).strings(keyword) == headers._Values(slow).strings(keyword), \
            keyword
    for field in ("syntax", "implicit", "little", "pixel_pos"):
        assert getattr(fast, field) == getattr(slow, field), field


def test_there_are_many_files_to_compare():
    assert len(WITH_PREAMBLE) > 100


@pytest.mark.parametrize("path", [p for p in WITH_PREAMBLE if p.name != "rtplan_truncated.dcm"],
                         ids=lambda p: p.name)
def test_scanner_agrees_with_pydicom(path):
    _compare(path)


def test_scanner_agrees_on_phantom_and_reads_in_chunks(phantom_dir, monkeypatch):
    path = next((phantom_dir / "Images" / "Phantom_000").glob("*.dcm"))
    _compare(path)
    whole = headers.read_header(path)
    monkeypatch.setattr(headers, "_HEAD_BYTES", 200)  # header longer than the first read
    assert isinstance(whole, headers.SliceHeader)
    assert headers.read_header(path) == whole


def test_truncated_inside_a_header_element_is_refused(tmp_path):
    target = tmp_path / "rtplan_truncated.dcm"
    target.write_bytes((TEST_FILES / "rtplan_truncated.dcm").read_bytes())
    with pytest.raises(DicomError, match="unreadable DICOM file"):
        headers.read_header(target)


DEFLATED = [p for p in WITH_PREAMBLE if b"1.2.840.10008.1.2.1.99" in p.read_bytes()[:1024]]


@pytest.mark.parametrize("path", DEFLATED, ids=lambda p: p.name)
def test_deflated_scanner_agrees_with_pydicom(path):
    """Deflated datasets are inflated only up to their pixel data, with pydicom's values."""
    data = path.read_bytes()
    with open(path, "rb") as fp:
        fast = headers.scan_header(data, len(data), fp)
        fp.seek(0)
        slow = headers.pydicom_header(fp)
    for keyword in headers.HEADER_KEYWORDS:
        assert headers._Values(fast).strings(keyword) == headers._Values(slow).strings(keyword), \
            keyword
    assert (fast.pixel_pos is None) == (slow.pixel_pos is None)


def test_there_are_deflated_files_to_compare():
    assert DEFLATED
