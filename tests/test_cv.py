"""`ctseg cv` on the 3-case phantom: patient-disjoint folds, test cases never loaded by training or
selection, outputs that agree with each other and with a rescoring of the saved masks, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import ctseg.train.loop
from ctseg.cli import main
from ctseg.data import discover_cases
from ctseg.evaluate.evaluate import evaluate_predictions
from ctseg.train import train
from ctseg.infer.model_loader import load_checkpoint


def tiny_config(root: Path) -> dict:
    """As small as test_train's runs: 32x32 slices, features [4, 8], three epochs of 64 slices per fold."""
    return {
        "data": {"size": [32, 32], "window": [-1000, 400], "foreground_ratio": 0.5,
                 "cache_dir": str(root / "cache")},
        "split": {"seed": 0, "val_fraction": 0.5},
        "model": {"name": "unet", "features": [4, 8]},
        "loss": {"lambda_dice": 0.3, "lambda_ce": 0.7},
        "optim": {"lr": 0.01},
        "train": {"epochs": 3, "batch_size": 4, "seed": 3, "slices_per_epoch": 64},
        "infer": {"batch_size": 8},
        "tracking": {"experiment": "ctseg-cv-test"},
    }


class LoadSpy:
    """Records, per call of the trainer's case loading, the fold's test cases and the cases loaded
    (the real loader still runs: this observes what training actually read)."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, ...], list[str]]] = []
        self.real = ctseg.train.loop.cache_cases

    def __call__(self, cases, config, *args, **kwargs):
        cases = list(cases)
        self.calls.append((tuple(config["split"].get("test", [])), [c.name for c in cases]))
        return self.real(cases, config, *args, **kwargs)


def run_cv(monkeypatch, config_path: Path, case_dir: Path, output: Path, *extra: str) -> tuple[int, LoadSpy]:
    spy = LoadSpy()
    monkeypatch.setattr(ctseg.train.loop, "cache_cases", spy)
    code = main(["cv", "--config", str(config_path), "--case-dir", str(case_dir), "--output", str(output),
                 "--device", "cpu", *extra])
    return code, spy


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(phantom_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cv")
    config_path = root / "cv.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(root)))
    with pytest.MonkeyPatch.context() as mp:
        code, spy = run_cv(mp, config_path, phantom_dir, root / "runs" / "cv")
    assert code == 0
    return {"root": root, "config": config_path, "out": root / "runs" / "cv", "spy": spy, "cases": phantom_dir,
            "names": [c.name for c in discover_cases(phantom_dir)]}


def test_each_case_is_tested_once_by_a_fold_that_never_loaded_it(study):
    out, names = study["out"], study["names"]
    rows = read_csv(out / "cv.csv")
    assert sorted(r["case"] for r in rows) == sorted(names)  # leave-one-case-out: 3 folds
    assert sorted(int(r["fold"]) for r in rows) == [0, 1, 2]
    for row in rows:
        fold_dir = out / f"fold_{row['fold']}"
        split = json.loads((fold_dir / "split.json").read_text())
        assert split["test"] == [row["case"]]
        assert row["case"] not in split["train"] + split["val"]
        assert sorted(split["train"] + split["val"] + split["test"]) == sorted(names)
        assert split["val"], "2 training cases and val_fraction 0.5: an inner validation case"
        done = json.loads((fold_dir / "cv_fold.json").read_text())
        assert done["selection"] == row["selection"] == "best"
        # what the trainer actually loaded for this fold: its train + inner val cases, never the test case
        loaded = [n for test, ns in study["spy"].calls if test == (row["case"],) for n in ns]
        assert sorted(loaded) == sorted(split["train"] + split["val"])
        scored = json.loads((fold_dir / "metrics.json").read_text())["val_per_case"]
        assert sorted(scored) == sorted(split["val"])  # what picked the checkpoint: inner validation only
        assert (out / "predictions" / f"{row['case']}.nii.gz").is_file()
        assert (fold_dir / "checkpoints" / "best.pt").is_file()


def test_csv_summary_and_a_rescoring_of_the_saved_masks_agree(study, phantom_dir, tmp_path):
    out = study["out"]
    rows = read_csv(out / "cv.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "leave-one-case-out" and summary["folds"] == 3 and summary["cases"] == 3
    dice = [float(r["dice"]) for r in rows]
    stats = summary["metrics"]["dice"]
    # cv.csv holds 6 significant digits
    assert stats["mean"] == pytest.approx(sum(dice) / 3, rel=1e-5)
    assert stats["min"] == pytest.approx(min(dice), rel=1e-5)
    assert stats["max"] == pytest.approx(max(dice), rel=1e-5)
    assert summary["worst_case"]["case"] == min(rows, key=lambda r: float(r["dice"]))["case"]
    assert sorted(c for f in summary["per_fold"] for c in f["test_cases"]) == sorted(study["names"])
    for key in ("iou", "hd95_mm", "assd_mm", "nsd"):
        assert key in summary["metrics"] and all(r[key] != "" for r in rows)
    assert all(float(r["train_seconds"]) > 0 for r in rows)
    assert (out / "cv_dice.png").stat().st_size > 0

    # `ctseg evaluate`'s scoring of the masks cv wrote gives the same per-case figures
    rescored = evaluate_predictions(out / "predictions", phantom_dir, tmp_path / "eval")
    assert rescored["cases"] == 3
    for key in ("dice", "hd95_mm", "nsd"):
        assert rescored["metrics"][key]["mean"] == pytest.approx(summary["metrics"][key]["mean"], rel=1e-9)


def test_folds_are_nested_runs_under_one_mlflow_cv_run(study):
    out = study["out"]
    info = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    parent = client.get_run(info["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["cv_dice_mean"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["metrics"]["dice"]["mean"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{info['run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["fold_0", "fold_1", "fold_2"]
    assert all("test_dice" in r.data.metrics for r in children)


def test_rerun_skips_finished_folds_and_redoes_only_what_is_missing(study, monkeypatch):
    """Fold 0 finished: skipped. Fold 1 trained but not scored (killed while predicting): resumed
    from its last.pt without another epoch, then scored. Fold 2 gone: trained again."""
    out = study["out"]
    kept = (out / "fold_0" / "cv_fold.json").stat().st_mtime_ns
    last_1 = (out / "fold_1" / "checkpoints" / "last.pt").stat().st_mtime_ns
    tests = {k: tuple(json.loads((out / f"fold_{k}" / "split.json").read_text())["test"]) for k in (1, 2)}
    (out / "fold_1" / "cv_fold.json").unlink()
    shutil.rmtree(out / "fold_2")
    code, spy = run_cv(monkeypatch, study["config"], study["cases"], out)
    assert code == 0
    assert {test for test, _ in spy.calls} == {tests[1], tests[2]}  # fold 0 not loaded again
    assert (out / "fold_0" / "cv_fold.json").stat().st_mtime_ns == kept
    assert (out / "fold_1" / "checkpoints" / "last.pt").stat().st_mtime_ns == last_1
    assert len(read_csv(out / "fold_1" / "history.csv")) == 3
    assert all((out / f"fold_{k}" / "cv_fold.json").is_file() for k in (1, 2))
    assert sorted(r["case"] for r in read_csv(out / "cv.csv")) == sorted(study["names"])


def test_fixed_length_folds_when_there_is_no_inner_validation(phantom_dir, tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    config["split"]["val_fraction"] = 0.0
    path = tmp_path / "fixed.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "cv2"
    code, spy = run_cv(monkeypatch, path, phantom_dir, out, "--folds", "2")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "2-fold, patient-level"
    tested = []
    for fold in summary["per_fold"]:
        split = json.loads((out / f"fold_{fold['fold']}" / "split.json").read_text())
        metrics = json.loads((out / f"fold_{fold['fold']}" / "metrics.json").read_text())
        assert fold["selection"] == metrics["selection"] == "last" and split["val"] == []
        assert metrics["best_epoch"] == metrics["epochs"]  # the last epoch is the one kept
        loaded = [n for test, ns in spy.calls if test == tuple(split["test"]) for n in ns]
        assert sorted(loaded) == sorted(split["train"]) and not set(loaded) & set(split["test"])
        tested += split["test"]
    assert sorted(tested) == sorted(c.name for c in discover_cases(phantom_dir))


@pytest.mark.parametrize("extra, message", [
    (["--folds", "4"], "--folds must be between 2 and 3"),
    (["split.folds=3"], "cv makes its own patient-level folds"),
    (["train.selection=sometimes"], "train.selection must be one of"),
])
def test_bad_requests_are_refused_before_training(phantom_dir, tmp_path, monkeypatch, capsys, extra, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    code, spy = run_cv(monkeypatch, path, phantom_dir, tmp_path / "out", *extra)
    assert code == 2 and message in capsys.readouterr().err
    assert spy.calls == []


def test_a_folder_holding_another_study_is_refused(study, monkeypatch, capsys):
    code, spy = run_cv(monkeypatch, study["config"], study["cases"], study["out"], "train.epochs=2")
    assert code == 2 and "another config" in capsys.readouterr().err
    assert spy.calls == []


def test_fixed_length_runs_take_no_decision_from_validation(phantom_dir, tmp_path):
    """train.selection=last: validation only monitors, even where it would cut the LR (plateau
    patience 0) and stop the run (early stopping 1) under train.selection=best."""
    config = tiny_config(tmp_path)
    config["tracking"]["enabled"] = False
    config["split"]["val_fraction"] = 0.34
    config["optim"].update(plateau_patience=0, plateau_factor=0.1)
    config["train"].update(epochs=4, early_stopping=1, selection="last")
    run = train(config, phantom_dir, tmp_path / "fixed", device="cpu")
    history = read_csv(run / "history.csv")
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(history) == 4 and metrics["best_epoch"] == metrics["epochs"] == 4
    assert {float(row["lr"]) for row in history} == {0.01}
    assert metrics["best_val_dice"] == pytest.approx(float(history[-1]["val_dice"]), rel=1e-5)
    best, last = (load_checkpoint(run / "checkpoints" / name) for name in ("best.pt", "last.pt"))
    assert best["epoch"] == last["epoch"] == 4


def test_a_case_without_a_mask_is_refused_before_training(phantom_dir, tmp_path, monkeypatch, capsys):
    cases = tmp_path / "cases"
    shutil.copytree(phantom_dir, cases)
    masks = sorted((cases / "Segmentations").iterdir())
    masks[0].unlink()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    code, spy = run_cv(monkeypatch, path, cases, tmp_path / "out")
    assert code == 2 and "have no mask" in capsys.readouterr().err
    assert spy.calls == [] and not (tmp_path / "out").exists()
