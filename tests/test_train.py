"""Short real training runs on a tiny phantom: run folder, resume, cache reuse, MLflow, privacy."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
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
from ctseg.io import load_series, save_nifti
from ctseg.train import train
from ctseg.infer.model_loader import load_checkpoint
from ctseg.train.run_record import read_run_record
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


def _untracked(root: Path, overrides: list[str]) -> dict:
    """tiny_config with dotted overrides, without MLflow (faster, and nothing to check there)."""
    config = apply_overrides(tiny_config(root), overrides)
    config["tracking"]["enabled"] = False
    return config


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


def test_resume_finds_the_recorded_case_folder(runs):
    """Run B resumed with only its own config.yaml (no case folder in it): run.json supplied it."""
    assert yaml.safe_load((runs["b"] / "config.yaml").read_text())["data"]["case_dir"] is None
    assert read_run_record(runs["b"]).case_dir == str(Path(runs["cases"]).resolve())
    assert json.loads((runs["b"] / "metrics.json").read_text())["epochs"] == 2


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
    # where the run read its data is run metadata (run.json), not part of the model config
    assert config["data"]["case_dir"] is None and config["data"]["cache_dir"] is None
    record = read_run_record(run)
    assert record.case_dir == str(Path(runs["cases"]).resolve())
    assert record.cache_dir == str((runs["root"] / "cache").resolve())
    assert record.versions["torch"] == torch.__version__ and record.machine["cpus"] == os.cpu_count()

    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "config", "split", "rng", "network"} <= set(ckpt)
    assert ckpt["network"] == {"name": "unet", "in_channels": 1, "out_channels": 1, "features": [4, 8],
                               "kwargs": {}}
    assert ckpt["split"] == split and ckpt["epoch"] == 2


@pytest.fixture(scope="module")
def learned_run(runs, tmp_path_factory) -> Path:
    """A run that really segments (validation Dice about 0.8): 3 epochs of 64 slices, 8..16 features."""
    config = _untracked(runs["root"], ["train.epochs=3", "train.slices_per_epoch=64",
                                       "model.features=[8,16]"])
    return train(config, runs["cases"], tmp_path_factory.mktemp("learned") / "run", device="cpu")


@pytest.mark.slow
def test_best_checkpoint_predicts_like_validation(learned_run, runs, tmp_path, capsys):
    """`ctseg predict` with the run folder, scored by `ctseg evaluate`, gives the Dice the run
    logged for its validation case (best checkpoint, same preprocessing and post-processing).

    Tolerance: the forward pass may run with other threads than training's validation did, so a
    voxel whose probability sits on the threshold can flip; one flipped voxel moves the Dice by at
    most 2 / (|pred| + |truth|), and three are allowed (about 1e-3 here)."""
    run = learned_run
    logged = json.loads((run / "metrics.json").read_text())["val_per_case"]
    val = json.loads((run / "split.json").read_text())["val"]
    assert main(["predict", "--model", str(run), "--input", str(runs["cases"]),
                 "--output", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(runs["cases"]),
                 "--output", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    with open(tmp_path / "eval" / "cases.csv", newline="") as f:
        scored = {row["case"]: float(row["dice"]) for row in csv.DictReader(f)}
    with open(tmp_path / "eval" / "slices.csv", newline="") as f:
        slices = list(csv.DictReader(f))
    for case in val:
        voxels = sum(int(r["truth_pixels"]) + int(r["pred_pixels"]) for r in slices if r["case"] == case)
        assert voxels > 100 and 0.5 < logged[case]["dice"] < 1.0  # a case worth comparing
        assert scored[case] == pytest.approx(logged[case]["dice"], abs=3 * 2 / voxels), case


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


# --------------------------------------------------------------------------- stopping and schedule

@pytest.fixture(scope="module")
def plateau_run(runs, tmp_path_factory) -> Path:
    """The tiny network, which barely improves, with early stopping (patience 2) and the LR halved
    after every epoch without a better Dice (floored at 0.003): both rules get to act."""
    config = _untracked(runs["root"], ["train.epochs=8", "train.early_stopping=2", "optim.lr=0.01",
                                       "optim.plateau_patience=0", "optim.plateau_factor=0.5",
                                       "optim.min_lr=0.003"])
    return train(config, runs["cases"], tmp_path_factory.mktemp("plateau") / "run", device="cpu")


def test_early_stopping_stops_patience_epochs_after_the_best(plateau_run):
    metrics = json.loads((plateau_run / "metrics.json").read_text())
    dice = [float(row["val_dice"]) for row in _history(plateau_run)]
    assert len(dice) == metrics["epochs"] < 8  # stopped before train.epochs
    assert metrics["epochs"] == metrics["best_epoch"] + 2
    assert max(dice[metrics["best_epoch"]:]) <= dice[metrics["best_epoch"] - 1]
    assert load_checkpoint(plateau_run / "checkpoints" / "best.pt")["epoch"] == metrics["best_epoch"]


def test_learning_rate_follows_reduce_on_plateau_of_the_validation_dice(plateau_run):
    """The logged LR of each epoch is what torch's ReduceLROnPlateau gives for the logged Dice."""
    rows = _history(plateau_run)
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, mode="max", factor=0.5,
                                                          patience=0, min_lr=0.003)
    expected = []
    for row in rows:
        schedule.step(float(row["val_dice"]))
        expected.append(reference.param_groups[0]["lr"])
    logged = [float(row["lr"]) for row in rows]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert logged[0] == 0.01 and min(logged) == pytest.approx(0.003)  # reduced, down to min_lr


def test_time_limit_stops_after_the_epoch_that_crosses_it(runs, tmp_path, caplog):
    config = _untracked(runs["root"], ["train.epochs=5", "train.early_stopping=null",
                                       "train.time_limit_minutes=0.0001"])  # 6 ms: inside epoch 1
    with caplog.at_level(logging.INFO, logger="ctseg.train.loop"):
        run = train(config, runs["cases"], tmp_path / "run", device="cpu")
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert len(_history(run)) == 1 and (run / "checkpoints" / "best.pt").is_file()
    assert any("time limit of 0.0001 min reached" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- data pipeline options

def test_context_slices_train_a_multichannel_network_that_predicts(runs, tmp_path, capsys):
    config = _untracked(runs["root"], ["train.epochs=1", "data.context=3"])
    run = train(config, runs["cases"], tmp_path / "run", device="cpu")
    assert load_checkpoint(run / "checkpoints" / "best.pt")["network"]["in_channels"] == 3
    assert main(["predict", "--model", str(run), "--input", str(runs["cases"]),
                 "--output", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    capsys.readouterr()
    for case in discover_cases(runs["cases"]):
        mask = nib.load(tmp_path / "pred" / f"{case.name}.nii.gz")
        assert mask.shape == load_series(case.image).array.T.shape  # NIfTI is (x, y, z)


@pytest.mark.slow
def test_loader_workers_only_parallelise_loading(runs, tmp_path, monkeypatch):
    """Without random augmentation, worker processes feed the same batches in the same order:
    the run is the one trained with loading in the main process (and the workers did load)."""
    from ctseg.data.dataset import SliceDataset

    getitem = SliceDataset.__getitem__

    def spy(self, i):  # runs in the worker processes: leaves a file named after the process
        (tmp_path / "loaders" / str(os.getpid())).touch()
        return getitem(self, i)

    monkeypatch.setattr(SliceDataset, "__getitem__", spy)
    outcomes, timing = [], {"epoch_seconds", "slices_per_second"}
    for workers in (0, 2):
        (tmp_path / "loaders").mkdir()
        config = _untracked(runs["root"], ["train.epochs=2", f"train.num_workers={workers}"])
        config["augment"] = {}
        run = train(config, runs["cases"], tmp_path / f"workers{workers}", device="cpu")
        loaders = {int(p.name) for p in (tmp_path / "loaders").iterdir()}
        assert (loaders == {os.getpid()}) if workers == 0 else (len(loaders - {os.getpid()}) >= workers)
        shutil.rmtree(tmp_path / "loaders")
        outcomes.append(([{k: v for k, v in r.items() if k not in timing} for r in _history(run)],
                         load_checkpoint(run / "checkpoints" / "last.pt")["model"]))
    (history0, weights0), (history2, weights2) = outcomes
    assert history0 == history2
    for key in weights0:
        assert torch.equal(weights0[key], weights2[key]), key
