"""How identifiers and file names appear in messages: UIDs masked, control characters escaped.

SeriesInstanceUIDs often embed the acquisition date and time, so messages and logs show a short
digest instead (the same digest `ctseg series` lists, and `--series` accepts). A file name may
hold a newline or other control character; printed raw it would forge a log line, so such a
name is shown quoted as Python's repr writes it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Hex digits of the digest shown for a UID: collisions within one folder are negligible.
_DIGEST_CHARS = 8


def mask_uid(uid: str | None) -> str:
    """`uid#1a2b3c4d`: a stable stand-in for a UID that reveals none of its digits."""
    if not uid:
        return "(no UID)"
    return "uid#" + hashlib.sha256(uid.encode()).hexdigest()[:_DIGEST_CHARS]


def show_path(path: str | Path) -> str:
    """The path as text, repr-quoted when it holds a character that is not printable."""
    text = str(path)
    return text if text.isprintable() else repr(text)
