"""Short real training runs on a tiny phantom: run folder, resume, cache reuse, MLflow, privacy."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml

import ctseg.io
from ctseg.cli import main
from ctseg.config import apply_overrides, load_config
from ctseg.data import discover_cases
from ctseg.data.phantom import write_phantom_dataset
from ctseg.errors import ConfigError
from ctseg.infer.predictor import predict_volume
from ctseg.io import load_series, save_nifti
from ctseg.train import train
from ctseg.train.checkpoint import load_checkpoint, load_model
from ctseg.train.loop import HISTORY_COLUMNS
from ctseg.train.tracking import Tracker

PATIENT_NAME, PATIENT_ID = "Doe^Janet", "SECRET-4711"


def tiny_config(root: Path, **train_overrides) -> dict:
    config = {
        "data": {"size": [32, 32], "window": [-1000, 400], "foreground_ratio": 0.5,
                 "cache_dir": str(root / "cache")},
        "split": {"seed": 0, "val_fraction": 0.34},
        "model": {"name": "unet", "features": [4, 8]},
        "loss": {"lambda_dice": 0.3, "lambda_ce": 0.7},
        "optim": {"lr": 0.01},
        "train": {"epochs": 2, "batch_size": 8, "seed": 3},
        "augment": {"rotate": {"prob": 0.5, "degrees": 10}, "flip": {"prob": 0.5},
                    "noise": {"prob": 0.5, "std": 0.02}},
        "infer": {"batch_size": 8},
        "tracking": {"uri": f"sqlite:///{root / 'runs' / 'mlflow.db'}", "experiment": "ctseg-test"},
    }
    return apply_overrides(config, [f"train.{k}={v}" for k, v in train_overrides.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run A: 2 epochs straight. Run B: 1 epoch, then resumed to 2 (counting DICOM reads)."""
    root = tmp_path_factory.mktemp("train")
    cases = write_phantom_dataset(root / "phantom", n_cases=3, seed=1, rows=48, cols=48, slices=10,
                                  patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    run_a = train(tiny_config(root), cases, root / "runs" / "a")

    reads = []
    real = ctseg.io.load_series
    ctseg.io.load_series = lambda *a, **k: reads.append(a[0]) or real(*a, **k)
    try:
        train(tiny_config(root, epochs=1), cases, root / "runs" / "b")
        resumed = load_config(root / "runs" / "b" / "config.yaml", ["train.epochs=2"])
        run_b = train(resumed, resume=root / "runs" / "b")
    finally:
        ctseg.io.load_series = real
    return {"root": root, "cases": cases, "a": run_a, "b": run_b, "reads_b": reads}


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_is_complete(runs):
    run = runs["a"]
    for name in ("config.yaml", "split.json", "metrics.json", "history.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt", "qc/best.png", "qc/median.png", "qc/worst.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("best_val_dice", "best_epoch", "epochs", "train_seconds", "slices_per_second"):
        assert key in metrics
    assert metrics["epochs"] == 2 and 1 <= metrics["best_epoch"] <= 2
    assert 0.0 <= metrics["best_val_dice"] <= 1.0 and metrics["slices_per_second"] > 0
    rows = _history(run)
    assert len(rows) == 2 and tuple(rows[0]) == HISTORY_COLUMNS

    split = json.loads((run / "split.json").read_text())
    assert split["val"] and split["train"] and not set(split["train"]) & set(split["val"])
    assert set(metrics["val_per_case"]) == set(split["val"])
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["clip_grad_norm"] == 1.0  # defaults are resolved into the saved config
    assert config["data"]["case_dir"] == str(Path(runs["cases"]).resolve())

    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "config", "split", "rng", "network"} <= set(ckpt)
    assert ckpt["network"] == {"name": "unet", "in_channels": 1, "out_channels": 1, "features": [4, 8],
                               "kwargs": {}}
    assert ckpt["split"] == split and ckpt["epoch"] == 2


def test_best_checkpoint_predicts_like_validation(runs):
    run = runs["a"]
    model, config = load_model(run)
    case = next(c for c in discover_cases(runs["cases"])
                if c.name == json.loads((run / "split.json").read_text())["val"][0])
    volume = load_series(case.image)
    labels, probs = predict_volume(model, volume.array, config)
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert probs.shape == (2, *volume.shape)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_resume_restores_exactly(runs):
    a, b = _history(runs["a"]), _history(runs["b"])
    timing = {"epoch_seconds", "slices_per_second"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b]
    wa = load_checkpoint(runs["a"] / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(runs["b"] / "checkpoints" / "last.pt")["model"]
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ma = json.loads((runs["a"] / "metrics.json").read_text())
    mb = json.loads((runs["b"] / "metrics.json").read_text())
    assert (ma["best_val_dice"], ma["best_epoch"]) == (mb["best_val_dice"], mb["best_epoch"])


def test_cache_is_reused_without_reading_dicom(runs):
    assert runs["reads_b"] == []


def test_existing_run_folder_is_refused(runs):
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(runs["root"]), runs["cases"], runs["a"])


def test_mlflow_holds_runs_metrics_and_artifacts(runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs['root'] / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctseg-test")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == {"a", "b"}  # the resumed run continued its MLflow run
    for name in ("a", "b"):
        run = found[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["model.name"] == "unet"
        assert run.data.params["loss.lambda_ce"] == "0.7"
        assert "version.torch" in run.data.params and "git_commit" in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_dice")
        assert sorted(m.step for m in history) == [1, 2]
        assert {"train_loss", "lr", "epoch_seconds", "slices_per_second", "best_val_dice"} <= set(run.data.metrics)
        top = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "split.json", "metrics.json", "history.csv", "checkpoints", "qc"} <= top
        assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
        assert len(client.list_artifacts(run.info.run_id, "qc")) == 3


def test_no_patient_identifier_anywhere(runs):
    root = runs["root"]
    header = pydicom.dcmread(next((Path(runs["cases"]) / "Images").rglob("*.dcm")), stop_before_pixels=True)
    assert str(header.PatientName) == PATIENT_NAME
    secrets = [PATIENT_NAME.encode(), b"Janet", PATIENT_ID.encode(), str(header.StudyDate).encode()]
    scanned = 0
    for path in root.rglob("*"):
        if path.is_file() and "phantom" not in path.relative_to(root).parts:
            data = path.read_bytes()
            scanned += 1
            for secret in secrets:
                assert secret not in data, f"{secret!r} found in {path}"
    assert scanned > 10  # the MLflow store, its artifacts, the run folders and the cache


def test_tracking_failure_does_not_stop_training(runs, tmp_path, caplog):
    config = tiny_config(runs["root"], epochs=1)
    config["tracking"]["uri"] = f"sqlite:///{tmp_path / 'not-a-dir' / 'x' / 'mlflow.db'}"
    (tmp_path / "not-a-dir").write_text("a file where the store's folder should be")
    with caplog.at_level(logging.WARNING, logger="ctseg.train.tracking"):
        run = train(config, runs["cases"], tmp_path / "run")
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    warnings = [r for r in caplog.records if r.name == "ctseg.train.tracking"]
    assert len(warnings) == 1 and "training goes on" in warnings[0].getMessage()


def test_tracking_store_failing_mid_run_is_reported_once(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker({"tracking": {"uri": uri}}, tmp_path / "run")
    tracker.start({"model": {"name": "unet"}})
    assert tracker.run_id is not None
    MlflowClient(uri).delete_run(tracker.run_id)  # the store now refuses writes to this run
    with caplog.at_level(logging.WARNING, logger="ctseg.train.tracking"):
        for step in range(3):
            tracker.log_metrics({"val_dice": 0.5}, step=step)
        tracker.end()
    assert len([r for r in caplog.records if r.name == "ctseg.train.tracking"]) == 1
    assert not tracker.enabled


def test_multiclass_training_through_the_cli(runs, tmp_path, capsys):
    """Left/right lungs as labels 1 and 2 (NIfTI cases), softmax, via `ctseg train`."""
    cases_dir = tmp_path / "cases"
    cases_dir.mkdir()
    for case in discover_cases(runs["cases"]):
        volume = load_series(case.image)
        mask = ctseg.io.load_mask(case.label, volume)
        labels = mask.copy()
        labels[:, :, volume.shape[2] // 2:][mask[:, :, volume.shape[2] // 2:] > 0] = 2
        save_nifti(volume.array, volume.affine, cases_dir / f"{case.name}.nii.gz")
        save_nifti(labels.astype(np.uint8), volume.affine, cases_dir / f"{case.name}_seg.nii.gz")
    config_path = tmp_path / "multi.yaml"
    config = tiny_config(runs["root"], epochs=1)
    config["data"]["num_classes"] = 3
    config["tracking"]["enabled"] = False
    config_path.write_text(yaml.safe_dump(config))
    code = main(["train", "--config", str(config_path), "--case-dir", str(cases_dir),
                 "--output", str(tmp_path / "run"), "optim.name=rmsprop"])
    assert code == 0
    assert "best validation Dice" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    case_metrics = next(iter(metrics["val_per_case"].values()))
    assert {"dice_1", "dice_2"} <= set(case_metrics)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["network"]["out_channels"] == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["name"] == "rmsprop"
