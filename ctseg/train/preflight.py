"""Checks of the output location before a run reads any case: a run must not train for an hour
and then fail to write its first checkpoint."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ctseg.errors import ConfigError
from ctseg.infer.model_loader import build_model

#: Room for QC images, history, metrics and config beside the checkpoints.
_MARGIN_BYTES = 20 * 2**20


def checkpoint_bytes(spec: dict) -> int:
    """Size of one checkpoint: weights plus Adam's two moment buffers (built on the meta device,
    so nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(spec)
    tensors = [*model.parameters(), *model.buffers()]
    return 3 * sum(t.numel() * t.element_size() for t in tensors)


def check_output_location(run_dir: Path, spec: dict) -> None:
    """Create `run_dir` and refuse it, as a ConfigError, if it cannot be written or lacks room
    for best.pt, last.pt and the temporary copy an atomic save makes."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-") as probe:
            probe.write(b"ctseg")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise ConfigError(f"{run_dir}: the output folder cannot be written ({exc.strerror or exc}); "
                          "choose another --output") from exc
    needed = 3 * checkpoint_bytes(spec) + _MARGIN_BYTES
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ConfigError(f"{run_dir}: {free / 2**20:.1f} MB free, but the checkpoints and QC images "
                          f"need about {needed / 2**20:.1f} MB; free space or choose another --output")
