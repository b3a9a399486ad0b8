"""Small shared helpers: atomic writes, text made safe for CSV cells and log lines, device choice."""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: ctseg's temp names: `.<target>.ctseg<pid>.<random>.tmp`; the pid tells a live writer's temp file
#: from one a killed process left behind.
_TEMP_NAME = re.compile(r"^\..+\.ctseg(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")

#: First characters a spreadsheet reads as a formula (OWASP "CSV injection"), plus the quote
#: itself so that escaping can be undone without ambiguity.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files of atomic writes whose process is gone (killed mid-write).

    Only names of ctseg's own pattern are touched, and only when their writer's pid no longer
    runs on this machine, so a concurrent writer's temp file is left alone.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match and not _alive(int(match["pid"])) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    A crash mid-write leaves the previous file intact, never a truncated one; the temp file a
    SIGKILL leaves behind is removed by the next atomic write into the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.ctseg{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file owner-only; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    tmp_path.chmod(0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def csv_cell(text: str) -> str:
    """`text` safe for a spreadsheet: a leading = + - @ tab, CR or ' gets a ' prefix (OWASP), so a
    case named `=HYPERLINK(...)` is shown, never evaluated. `csv_uncell` undoes it."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_uncell(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


def log_text(text: object) -> str:
    """`text` with every non-printable character (newline, CR, escape codes) written as its Python
    escape, so a file name cannot start a forged line in a log or on the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def pick_device(requested: str | None = None):
    """`requested` if given ("cpu", "cuda", "cuda:1"), else CUDA when available, else CPU."""
    import torch

    if requested:
        return _checked_device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _checked_device(requested: str):
    """`requested` as a torch device, refused (ConfigError) when this machine does not have it."""
    import torch

    from ctseg.errors import ConfigError

    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {requested!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {requested}: Apple MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {requested}: ctseg runs on cpu, cuda or mps")
    return device
