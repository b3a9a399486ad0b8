"""The fast header scanner against pydicom, the reference, on every file pydicom ships.

A file the scanner hands to pydicom (`_UsePydicom`) compares nothing, so the tests also count the
files really compared: the fast path must read nearly all of them, and every phantom file.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from ctseg.errors import DicomError
from ctseg.io import dicom_headers as headers

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
WITH_PREAMBLE = sorted(p for p in TEST_FILES.rglob("*")
                       if p.is_file() and p.read_bytes()[128:132] == b"DICM")


COMPARABLE = [p for p in WITH_PREAMBLE if p.name != "rtplan_truncated.dcm"]


def _compare(path: Path) -> bool:
    """True when the fast scanner read `path` and agreed with pydicom on every field; False when
    it handed the file to pydicom (deflate, missing transfer syntax, malformed VRs)."""
    data = path.read_bytes()
    try:
        fast = headers.scan_header(data, len(data))
    except headers._UsePydicom:
        return False
    with open(path, "rb") as fp:
        slow = headers.pydicom_header(fp)
    for keyword in headers.HEADER_KEYWORDS:
        assert headers._Values(fast).strings(keyword) == headers._Values(slow).strings(keyword), \
            keyword
    for field in ("syntax", "implicit", "little", "pixel_pos"):
        assert getattr(fast, field) == getattr(slow, field), field
    return True


@pytest.mark.parametrize("path", COMPARABLE, ids=lambda p: p.name)
def test_scanner_agrees_with_pydicom(path):
    _compare(path)


def test_the_fast_path_reads_nearly_every_file_compared():
    """pydicom 3 ships 163 files with a preamble; 3 need pydicom (deflate, no transfer syntax,
    an RGB JPEG with a VR the scanner does not trust) and one is truncated on purpose."""
    compared = [p.name for p in COMPARABLE if _compare(p)]
    fallbacks = sorted({p.name for p in COMPARABLE} - set(compared))
    assert len(compared) > 100 and len(compared) >= 0.95 * len(COMPARABLE), fallbacks


def test_scanner_agrees_on_phantom_and_reads_in_chunks(phantom_dir, monkeypatch):
    path = next((phantom_dir / "Images" / "Phantom_000").glob("*.dcm"))
    assert _compare(path), "the phantom's files must take the fast path"
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
