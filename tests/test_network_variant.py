"""`model.variant` flows through: config -> training -> checkpoint spec -> model loader -> predict.

One 1-epoch run of the thesis ver5 (the variant that differs most from the default) on the tiny
phantom, loaded back by the inference loader and used by `ctseg predict`; and a checkpoint
written before variants existed (no `variant` in its spec) still loads as the default.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctseg.cli import main
from ctseg.infer.model_loader import build_model, load_checkpoint, load_model
from ctseg.networks.mfe import MFE, SplitMFE
from ctseg.train import train
from ctseg.train.checkpoint import save_checkpoint

CONFIG = {
    "data": {"size": [32, 32]},
    "model": {"name": "unet_mcnet", "features": [8, 16], "variant": "thesis"},
    "train": {"epochs": 1, "batch_size": 8, "early_stopping": None},
    "split": {"val_fraction": 0.34},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def thesis_run(tmp_path_factory, phantom_dir) -> Path:
    root = tmp_path_factory.mktemp("thesis_run")
    config = {**CONFIG, "data": {**CONFIG["data"], "cache_dir": str(root / "cache")}}
    return train(config, phantom_dir, root / "run", device="cpu")


def test_checkpoint_spec_names_the_variant(thesis_run: Path) -> None:
    state = load_checkpoint(thesis_run / "checkpoints" / "best.pt")
    assert state["network"]["variant"] == "thesis"
    assert state["config"]["model"]["variant"] == "thesis"


def test_loader_rebuilds_the_thesis_network_and_predicts(thesis_run: Path, phantom_dir: Path,
                                                         tmp_path: Path) -> None:
    loaded = load_model(thesis_run, device="cpu")
    assert any(isinstance(m, SplitMFE) for m in loaded.model.modules())
    saved = load_checkpoint(thesis_run / "checkpoints" / "best.pt")["model"]
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert main(["predict", "--model", str(thesis_run), "--input", str(phantom_dir),
                 "--output", str(tmp_path), "--device", "cpu"]) == 0
    masks = sorted(tmp_path.glob("*.nii.gz"))
    assert masks, list(tmp_path.iterdir())
    image = nib.load(masks[0])
    assert len(image.shape) == 3 and set(np.unique(np.asarray(image.dataobj))) <= {0, 1}


def test_checkpoint_without_variant_loads_as_default(thesis_run: Path, tmp_path: Path) -> None:
    """A run saved before `variant` existed: its spec has no key and its net is the default."""
    state = load_checkpoint(thesis_run / "checkpoints" / "best.pt")
    old = {key: value for key, value in state["network"].items() if key != "variant"}
    config = {**state["config"], "model": {k: v for k, v in state["config"]["model"].items()
                                           if k != "variant"}}
    default = build_model(old)
    save_checkpoint(tmp_path / "old.pt", {**state, "network": old, "config": config,
                                          "model": default.state_dict()})
    loaded = load_model(tmp_path / "old.pt", device="cpu")
    assert any(isinstance(m, MFE) for m in loaded.model.modules())
    assert not any(isinstance(m, SplitMFE) for m in loaded.model.modules())
