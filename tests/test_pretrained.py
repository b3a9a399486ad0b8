"""The packaged default model: `ctseg package-model` writes a small half-precision file and a card
whose figures come from the run and `ctseg cv`'s files; `ctseg predict` without --model uses it,
with masks equal to the float32 run's up to a few boundary voxels; an absent file is a clear error."""

from __future__ import annotations

import csv
import hashlib
import re
import statistics
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from ctseg.cli import DEFAULT_MODEL_ENV, main
from ctseg.errors import ModelError
from ctseg.infer import Segmenter
from ctseg.infer.export import eval_metrics, read_cv_summary
from ctseg.infer.package import data_note_text, package_model, recipe_differences
from ctseg.pretrained import CARD_NAME, FORMAT, MAX_BYTES, WEIGHTS

from infer_helpers import tiny_run

CASE = "Phantom_001"
NOTE = ("# Phantom\n\nSource: the synthetic CT phantom of ctseg.data.phantom, written as DICOM.\n\n"
        "Layout: seed layout.\n\nLicence: CC0, no attribution needed.\n")
CV_CONFIG = {  # as tests/test_cv.py's: 32x32 slices, features [4, 8], three short epochs per fold
    "data": {"size": [32, 32], "window": [-1000, 400], "foreground_ratio": 0.5},
    "split": {"seed": 0, "val_fraction": 0.5},
    "model": {"name": "unet", "features": [4, 8]},
    "optim": {"lr": 0.01},
    "train": {"epochs": 3, "batch_size": 4, "seed": 3, "slices_per_epoch": 64},
    "infer": {"batch_size": 8},
    "tracking": {"experiment": "ctseg-pretrained-test"},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


@pytest.fixture(scope="module")
def cv_dir(tmp_path_factory, phantom_dir) -> Path:
    """A real `ctseg cv` output folder on the phantom (leave-one-case-out, 3 folds)."""
    root = tmp_path_factory.mktemp("cv")
    config = {**CV_CONFIG, "data": {**CV_CONFIG["data"], "cache_dir": str(root / "cache")}}
    (root / "cv.yaml").write_text(yaml.safe_dump(config))
    assert main(["cv", "--config", str(root / "cv.yaml"), "--case-dir", str(phantom_dir),
                 "--output", str(root / "cv"), "--device", "cpu"]) == 0
    return root / "cv"


@pytest.fixture(scope="module")
def packaged(run_dir, cv_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packaged")
    (root / "README.md").write_text(NOTE)
    assert main(["package-model", "--run", str(run_dir), "--cv", str(cv_dir), "--output", str(root / "out"),
                 "--data-note", str(root / "README.md"), "--train-command", "ctseg train --config tiny.yaml"]) == 0
    return root / "out" / WEIGHTS.name


def predict(tmp_path: Path, phantom_dir: Path, *model: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and foreground probabilities of one phantom case."""
    out = tmp_path / ("run" if model else "default")
    assert main(["predict", *model, "--input", str(phantom_dir / "Images" / CASE), "--output", str(out),
                 "--device", "cpu", "--probabilities"]) == 0
    return (np.asarray(nib.load(out / f"{CASE}.nii.gz").dataobj),
            np.asarray(nib.load(out / "probabilities" / f"{CASE}.nii.gz").dataobj))


def test_packaged_file_is_small_half_precision_and_loadable(packaged):
    assert packaged.stat().st_size <= MAX_BYTES
    state = torch.load(packaged, weights_only=True)
    assert state["format"] == FORMAT
    floats = [t for t in state["model"].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)
    assert "case_dir" not in state["config"]["data"] and "tracking" not in state["config"]
    loaded = Segmenter.load(default_model=packaged, device="cpu").loaded
    assert loaded.kind == "pretrained"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.sha256 == hashlib.sha256(packaged.read_bytes()).hexdigest()


def test_predict_without_model_uses_the_default_and_matches_float32(packaged, run_dir, phantom_dir, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(packaged))
    half, half_prob = predict(tmp_path, phantom_dir)
    printed = capsys.readouterr().out
    digest = hashlib.sha256(packaged.read_bytes()).hexdigest()
    assert f"model: pretrained {packaged} (sha256 {digest[:12]})" in printed
    full, full_prob = predict(tmp_path, phantom_dir, "--model", str(run_dir))
    assert full.any()
    # Half-precision weights (relative rounding <= 2**-11) move the probabilities far less than
    # this bound, so only voxels at the threshold may flip: at most 1% of the foreground.
    assert np.abs(half_prob - full_prob).max() <= 0.02
    differ = int((half != full).sum())
    assert differ <= 0.01 * (full > 0).sum()
    print(f"half vs float32: {differ} of {full.size} voxels differ ({int((full > 0).sum())} foreground)")


def test_card_reports_the_cv_figures_of_the_cv_folder(packaged, cv_dir):
    card = (packaged.parent / CARD_NAME).read_text()
    with open(cv_dir / "cv.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    dice = [float(r["dice"]) for r in rows]
    found = re.search(r"Volume Dice mean ([\d.]+), sd ([\d.]+), worst case ([\d.]+) \(`([^`]+)`", card)
    assert found, card
    for shown, expected in zip(found.groups()[:3], (statistics.mean(dice), statistics.stdev(dice), min(dice))):
        assert abs(float(shown) - expected) <= 5e-5 + 1e-6  # printed to 4 decimals from 6-digit csv cells
    assert found.group(4) == rows[int(np.argmin(dice))]["case"]
    for r in rows:
        assert f"| {r['fold']} | {r['case']} | {r['dice']} |" in card
    assert "leave-one-case-out" in card
    # the tiny run is not the cross-validated recipe (other widths, a validation case): the card says so
    assert "**this model differs** from what was cross-validated in its training cases" in card
    assert "model.features" in card and "split" not in card.split("its settings (")[1].split(")")[0]
    # the bundle's metadata.json (export-bundle --cv) reports the same figures from the same file
    metrics, method = eval_metrics({"metrics": None, "cv": read_cv_summary(cv_dir)}, [])
    assert abs(metrics["cv_mean_dice"] - float(found.group(1))) <= 1e-4 + 1e-9
    assert abs(metrics["cv_worst_dice"] - float(found.group(3))) <= 1e-4 + 1e-9
    assert "leave-one-case-out" in method["cv_mean_dice"]


def test_card_says_data_recipe_command_and_limits(packaged, run_dir):
    card = (packaged.parent / CARD_NAME).read_text()
    assert "> Source: the synthetic CT phantom" in card and "> Licence: CC0" in card
    assert "Layout: seed layout" not in card  # only where the data came from and its licence
    assert "`ctseg train --config tiny.yaml`" in card
    assert "features [8, 16]" in card
    assert hashlib.sha256(packaged.read_bytes()).hexdigest() in card
    for limit in ("Adult thoracic CT", "Both lungs as one label", "Not a medical device"):
        assert limit in card


def test_without_cv_the_card_says_there_are_no_cv_figures(run_dir, tmp_path):
    weights = package_model(run_dir, tmp_path)
    card = (tmp_path / CARD_NAME).read_text()
    assert "no cross-validation figures" in card.lower()
    assert "Volume Dice mean" not in card
    assert weights.is_file()


def test_a_model_over_the_size_limit_is_refused_and_nothing_written(run_dir, tmp_path):
    with pytest.raises(ModelError, match="over the 1,000"):
        package_model(run_dir, tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_absent_default_model_is_a_clear_error(phantom_dir, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "lungs.pt"
    with pytest.raises(ModelError, match="make pretrained"):
        Segmenter.load(default_model=missing)
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(missing))
    code = main(["predict", "--input", str(phantom_dir / "Images" / CASE), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "make pretrained" in err and "--model" in err


def test_the_lctsc_readme_gives_source_licence_and_citation():
    readme = Path(__file__).resolve().parents[2] / "shared" / "data" / "lctsc" / "README.md"
    if not readme.is_file():
        pytest.skip("the shared LCTSC sample is not here")
    note = data_note_text(readme)
    assert "CC BY 3.0" in note and "doi:10.7937/K9/TCIA.2017.3r3fvz08" in note
    assert "Layout" not in note


def test_recipe_differences_name_the_settings_not_the_paths(run_dir):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    other = {**config, "data": {**config["data"], "case_dir": "/elsewhere", "cache_dir": "/tmp/c"},
             "split": {"seed": 5}, "tracking": {"experiment": "x"}}
    assert recipe_differences(config, other) == []
    other["optim"] = {**config["optim"], "lr": 0.5}
    assert recipe_differences(config, other) == ["optim.lr"]
