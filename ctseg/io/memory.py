"""How much memory a read may take: checked against what is available now, before allocating.

Total RAM is the wrong yardstick on a shared machine (other processes, the page cache they
pin); MemAvailable is the kernel's estimate of what can be allocated without swapping.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctseg.errors import CTSegError


def available_memory() -> int | None:
    """Bytes that can be allocated without swapping (psutil, else /proc/meminfo); None: unknown."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): let numpy decide
        return None


def check_memory(needed: int, what: str, source: str | Path,
                 error: type[CTSegError] = CTSegError) -> None:
    """Refuse (`error` naming `source`) a read that would need more than the available memory."""
    available = available_memory()
    if available is not None and needed > available:
        raise error(f"{source}: {what} would need {needed / 2**30:.1f} GiB, more than the "
                    f"{available / 2**30:.1f} GiB of memory available now")
