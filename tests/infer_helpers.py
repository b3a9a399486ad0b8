"""A tiny trained run shared by the inference and bundle tests (trained once per test session)."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run_bundle_inference(bundle: Path, dataset_dir: Path, output_dir: Path) -> None:
    """`python -m monai.bundle run --config_file configs/inference.yaml` inside `bundle`, as its
    README says (MLflow variables of the test environment left out); fails with its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
                           "--dataset_dir", str(dataset_dir), "--output_dir", str(output_dir)],
                          cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
