"""A tiny trained run shared by the inference and bundle tests (trained once per test session)."""

from __future__ import annotations

from pathlib import Path

from ctseg.train import train

TINY_CONFIG = {
    "data": {"size": [32, 32]},
    "model": {"name": "unet", "features": [8, 16]},
    "train": {"epochs": 8, "batch_size": 8, "early_stopping": None},
    "split": {"val_fraction": 0.34},
    "optim": {"lr": 0.01},
    "tracking": {"enabled": False},
}
_RUNS: dict[Path, Path] = {}


def tiny_run(tmp_path_factory, phantom_dir: Path) -> Path:
    """A real run folder (`ctseg.train.train`) of an 8-epoch, 30k-parameter U-Net on the phantom.

    It segments the phantom's lungs with Dice ~0.8, enough for masks with real structure
    (two lungs, holes, boundaries) to compare voxel for voxel.
    """
    if phantom_dir not in _RUNS:
        root = tmp_path_factory.mktemp("tiny_run")
        config = {**TINY_CONFIG, "data": {**TINY_CONFIG["data"], "cache_dir": str(root / "cache")}}
        _RUNS[phantom_dir] = train(config, phantom_dir, root / "run", device="cpu")
    return _RUNS[phantom_dir]
