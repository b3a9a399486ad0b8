"""The MONAI-free route of `ctseg predict` (`ctseg.slices`) against MONAI: same inputs, same masks,
and a predict process that never imports MONAI (nor MLflow, matplotlib, pandas, ignite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import Resize
from monai.utils import convert_to_tensor

from ctseg.config import get
from ctseg.infer.model_loader import load_model
from ctseg.infer.volume import inference_batch_size, predict_volume, preprocess_volume
from ctseg.io import load_series
from ctseg.slices import context_slices, output_channels, stack_context, training_size
from ctseg.transforms import preprocess_transforms

from infer_helpers import tiny_run

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("monai", "mlflow", "matplotlib", "pandas", "ignite")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


def _monai_preprocess(hu: np.ndarray, config: dict) -> torch.Tensor:
    sample = preprocess_transforms(config, ("image",))({"image": torch.from_numpy(hu.astype(np.float32))})
    return convert_to_tensor(sample["image"], dtype=torch.float32, track_meta=False)


def _monai_predict(model: torch.nn.Module, hu: np.ndarray, config: dict) -> np.ndarray:
    """The MONAI route `predict_volume` replaced: MONAI preprocessing, `SlidingWindowInferer` over
    the slices, MONAI `Resize` back, threshold (binary) or argmax."""
    inputs = stack_context(_monai_preprocess(hu, config), context_slices(config))
    inferer = SlidingWindowInferer(roi_size=training_size(config), overlap=0.0,
                                   sw_batch_size=inference_batch_size(config, torch.device("cpu")))
    model.eval()
    with torch.inference_mode():
        logits = inferer(inputs, lambda x: model(x.contiguous(memory_format=torch.channels_last)))
    probs = torch.sigmoid(logits) if output_channels(config) == 1 else torch.softmax(logits, dim=1)
    depth, rows, cols = hu.shape
    channels = probs.shape[1]
    flat = probs.permute(1, 0, 2, 3).reshape(channels * depth, *probs.shape[2:])
    probs = convert_to_tensor(Resize(spatial_size=(rows, cols), mode="bilinear")(flat), track_meta=False)
    probs = probs.reshape(channels, depth, rows, cols)
    if channels == 1:
        return (probs[0].clamp(0.0, 1.0) >= float(get(config, "infer.threshold"))).to(torch.uint8).numpy()
    return probs.argmax(dim=0).to(torch.uint8).numpy()


@pytest.mark.parametrize(("shape", "size"), [
    ((5, 512, 512), (256, 256)),  # the LCTSC case: halved, Gaussian sigma 0.5
    ((4, 300, 280), (256, 256)),  # odd factors, different per axis
    ((3, 128, 128), (256, 256)),  # up-sampling: no anti-aliasing
    ((3, 200, 100), (64, 128)),   # one axis down, the other up
])
def test_lean_preprocessing_equals_monai(shape, size):
    rng = np.random.default_rng(sum(shape))
    hu = rng.normal(-400.0, 600.0, size=shape).astype(np.float32)  # well beyond the window both ways
    config = {"data": {"size": list(size), "window": [-1000, 400]}}
    lean = preprocess_volume(hu, config)[:, 0]
    assert lean.shape == (shape[0], *size)
    np.testing.assert_allclose(lean.numpy(), _monai_preprocess(hu, config).numpy(), rtol=0, atol=1e-6)


def test_lean_preprocessing_equals_monai_on_a_phantom_ct(phantom_dir):
    hu = load_series(phantom_dir / "Images" / "Phantom_000").array
    config = {"data": {"size": [48, 40], "context": 3}}
    lean = preprocess_volume(hu, config)
    monai = stack_context(_monai_preprocess(hu, config), 3)
    assert lean.shape == (hu.shape[0], 3, 48, 40)
    np.testing.assert_allclose(lean.numpy(), monai.numpy(), rtol=0, atol=1e-6)


def test_lean_masks_equal_the_monai_route(run_dir, phantom_dir):
    loaded = load_model(run_dir, device="cpu")
    for case in ("Phantom_000", "Phantom_001"):
        hu = load_series(phantom_dir / "Images" / case).array
        labels, _ = predict_volume(loaded.model, hu, loaded.config, device="cpu", probabilities=False)
        expected = _monai_predict(loaded.model, hu, loaded.config)
        assert expected.any() and not expected.all()  # a real mask, not a trivial one
        np.testing.assert_array_equal(labels, expected)


def test_predict_process_never_imports_monai(run_dir, phantom_dir, tmp_path):
    """`ctseg predict` run as a user runs it, in a fresh interpreter that lists its modules at exit."""
    argv = ["ctseg", "predict", "--model", str(run_dir), "--input", str(phantom_dir / "Images" / "Phantom_000"),
            "--output", str(tmp_path / "out"), "--device", "cpu"]
    listing = tmp_path / "modules.json"
    script = ("import atexit, json, runpy, sys\n"
              f"atexit.register(lambda: open({str(listing)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
              f"sys.argv = {argv!r}\n"
              "runpy.run_module('ctseg.cli', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "Phantom_000.nii.gz").is_file()
    modules = json.loads(listing.read_text())
    assert "torch" in modules and "ctseg.infer.volume" in modules  # it did run the predictor
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert loaded == [], f"ctseg predict imported {loaded[:10]}"
