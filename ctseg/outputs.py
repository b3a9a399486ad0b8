"""Output folders: checked before any work, shared safely, and never a file ctseg did not write.

A folder ctseg predicts into holds `.ctseg-manifest.json`: the size and modification time of
every file ctseg wrote there. A file of the same name that is not listed, or that changed since
(a mask corrected by hand in 3D Slicer, the CT itself), is the user's: ctseg refuses to replace
or delete it. `.ctseg.lock` (flock) serialises read-modify-write of the manifest and of tables
between processes writing into one folder (two `ctseg predict` runs, torchrun ranks).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ctseg.errors import CTSegError
from ctseg.utils import atomic_write_text, log_text

MANIFEST = ".ctseg-manifest.json"
LOCK = ".ctseg.lock"


def check_writable_dir(folder: str | Path) -> Path:
    """Create `folder` and prove it writable (create + remove a probe file) before any work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CTSegError(f"{log_text(folder)}: the output is an existing file, not a folder; "
                         "choose a folder for the output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ctseg-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CTSegError(f"{log_text(folder)}: the output folder cannot be written "
                         f"({exc.strerror or exc}); choose another output location") from exc
    return folder


def check_writable_file(path: str | Path) -> Path:
    """Refuse an output file path that is a folder or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise CTSegError(f"{log_text(path)}: the output is an existing folder; give a file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise CTSegError(f"{log_text(path)}: cannot be written: {log_text(path.parent)} is a file, not a folder")
    check_writable_dir(path.parent)
    return path


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on `folder` between processes (released when the block ends or the process dies)."""
    with open(Path(folder) / LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _key(folder: Path, path: Path) -> str:
    return Path(os.path.relpath(path, folder)).as_posix()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_manifest(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of ctseg's files; an unreadable manifest owns nothing."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _write_manifest(folder: Path, files: dict[str, list[int]]) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def is_ours(folder: Path, path: Path, manifest: dict | None = None) -> bool:
    """Whether `path` is a file ctseg wrote into `folder`, unchanged since."""
    manifest = read_manifest(folder) if manifest is None else manifest
    try:
        return path.is_file() and not path.is_symlink() and manifest.get(_key(folder, path)) == _stamp(path)
    except OSError:
        return False


def check_replaceable(folder: Path, paths: Iterable[Path], inputs: Iterable[Path] = ()) -> None:
    """Refuse, before any work, outputs that would replace an input or a file ctseg did not write."""
    inputs = [Path(p) for p in inputs if Path(p).is_file()]
    manifest = read_manifest(folder)
    for path in paths:
        if not os.path.lexists(path):
            continue
        for source in inputs:
            if path.exists() and os.path.samefile(path, source):
                raise CTSegError(f"{log_text(path)}: this output would overwrite the input "
                                 f"{log_text(source)}; choose another --output folder")
        if not is_ours(folder, path, manifest):
            raise CTSegError(f"{log_text(path)}: exists and was not written by ctseg (or was changed "
                             "since); it is left as it is: move it or choose another --output folder")


def record(folder: Path, *paths: Path) -> None:
    """Add the files just written to the manifest (call under `folder_lock`)."""
    manifest = read_manifest(folder)
    for path in paths:
        manifest[_key(folder, path)] = _stamp(path)
    _write_manifest(folder, manifest)


def remove_ours(folder: Path, *paths: Path) -> list[Path]:
    """Delete those of `paths` ctseg wrote and nobody changed (call under `folder_lock`)."""
    manifest = read_manifest(folder)
    removed = [p for p in paths if is_ours(folder, p, manifest)]
    for path in removed:
        path.unlink()
        manifest.pop(_key(folder, path), None)
    if removed:
        _write_manifest(folder, manifest)
    return removed
