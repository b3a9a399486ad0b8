"""`ctseg evaluate`, `ctseg report` and `ctseg compare` end to end on the tiny phantom."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from ctseg.cli import main
from ctseg.data import discover_cases
from ctseg.data.cache import load_case_volume
from ctseg.errors import CTSegError, MaskError
from ctseg.evaluate.evaluate import evaluate_predictions
from ctseg.io import load_mask, save_nifti

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_predictions(phantom_dir: Path, out: Path, edit=None) -> dict[str, np.ndarray]:
    """Each case's truth written as its prediction on the CT grid (`edit(name, mask, affine)` may alter it)."""
    truths = {}
    for case in discover_cases(phantom_dir):
        volume = load_case_volume(case)
        truth = load_mask(case.label, volume)
        pred, affine = truth.copy(), volume.affine.copy()
        if edit is not None:
            pred, affine = edit(case.name, pred, affine)
        save_nifti(pred, affine, out / f"{case.name}.nii.gz", kind="label")
        truths[case.name] = truth
    return truths


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_evaluate_writes_report_with_figures(phantom_dir, tmp_path):
    def edit(name, mask, affine):
        if name == "Phantom_001":  # lose the outer ring of one lung slice set
            mask = mask.copy()
            mask[:, :, : mask.shape[2] // 2] = 0
        if name == "Phantom_002":
            mask = np.roll(mask, 2, axis=2)
            mask[0, 0, :4] = 1  # a few stray pixels on an (empty-truth) end slice
        return mask, affine

    pred_dir = tmp_path / "pred"
    truths = _write_predictions(phantom_dir, pred_dir, edit)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["Phantom_000", "Phantom_001"], "val": [], "test": ["Phantom_002"],
                                 "seed": 0}))
    out = tmp_path / "eval"
    rc = main(["evaluate", "--pred", str(pred_dir), "--truth", str(phantom_dir), "--output", str(out),
               "--split", str(split), "--empty-threshold", "5"])
    assert rc == 0

    with open(out / "cases.csv") as fh:
        cases = {row["case"]: row for row in csv.DictReader(fh)}
    assert set(cases) == set(truths)
    assert float(cases["Phantom_000"]["dice"]) == 1.0 and float(cases["Phantom_000"]["hd95_mm"]) == 0.0
    assert 0.0 < float(cases["Phantom_001"]["dice"]) < 1.0
    assert float(cases["Phantom_001"]["precision"]) == 1.0  # only voxels removed
    assert cases["Phantom_002"]["group"] == "test" and cases["Phantom_000"]["group"] == "train"
    assert float(cases["Phantom_002"]["hd95_mm"]) > 0.0

    with open(out / "slices.csv") as fh:
        slices = list(csv.DictReader(fh))
    assert len(slices) == sum(t.shape[0] for t in truths.values())
    stray = next(r for r in slices if r["case"] == "Phantom_002" and r["slice"] == "0")
    assert not truths["Phantom_002"][0].any()
    assert stray["pred_pixels"] == "4" and float(stray["dice"]) == 1.0  # 4 < 5 pixels: counts as empty

    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and summary["empty_threshold_pixels"] == 5
    for key in ("dice", "iou", "precision", "recall", "accuracy", "hd95_mm", "assd_mm", "nsd"):
        assert set(summary["metrics"][key]) >= {"mean", "sd", "median", "min"}
    assert summary["metrics"]["dice"]["min"] == pytest.approx(float(cases["Phantom_001"]["dice"]))
    assert set(summary["groups"]) == {"train", "test"}

    report = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(links) == 1 + 3 + 3  # histogram, per-case slice Dice, per-case galleries
    for link in links:
        _assert_png(out / link)
    assert "threshold 5 pixels" in report


def test_geometry_mismatch_is_refused(phantom_dir, tmp_path, capsys):
    def shifted(name, mask, affine):
        affine = affine.copy()
        affine[0, 3] += 0.5  # half a millimetre off
        return mask, affine

    pred_dir = tmp_path / "shifted"
    _write_predictions(phantom_dir, pred_dir, shifted)
    with pytest.raises(MaskError, match="affine differs"):
        evaluate_predictions(pred_dir, phantom_dir, tmp_path / "out")

    cropped_dir = tmp_path / "cropped"
    _write_predictions(phantom_dir, cropped_dir, lambda n, m, a: (m[:-1], a))
    assert main(["evaluate", "--pred", str(cropped_dir), "--truth", str(phantom_dir),
                 "--output", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "shape" in err and ".nii.gz" in err
    assert not (tmp_path / "out2" / "report.md").exists()


def test_predictions_matched_by_name(phantom_dir, tmp_path):
    pred_dir = tmp_path / "pred"
    _write_predictions(phantom_dir, pred_dir)
    (pred_dir / "Phantom_001.nii.gz").rename(pred_dir / "Somebody_else.nii.gz")
    summary = evaluate_predictions(pred_dir, phantom_dir, tmp_path / "out")
    assert summary["cases"] == 2
    assert summary["unmatched_predictions"] == ["Somebody_else"]
    assert summary["cases_without_prediction"] == ["Phantom_001"]

    only_strangers = tmp_path / "strangers"
    only_strangers.mkdir()
    (pred_dir / "Somebody_else.nii.gz").rename(only_strangers / "Somebody_else.nii.gz")
    with pytest.raises(CTSegError, match="matches a labelled case"):
        evaluate_predictions(only_strangers, phantom_dir, tmp_path / "out3")


def test_run_split_separates_trained_selection_and_held_out_cases(phantom_dir, tmp_path, capsys):
    def edit(name, mask, affine):
        if name == "Phantom_002":  # the held-out case is the worst one: a flattering pool would hide it
            mask = mask.copy()
            mask[:, :, : mask.shape[2] // 2] = 0
        return mask, affine

    pred_dir = tmp_path / "pred"
    _write_predictions(phantom_dir, pred_dir, edit)
    run = tmp_path / "run"
    run.mkdir()
    # Phantom_002 is in no list: the run never loaded it
    (run / "split.json").write_text(json.dumps({"train": ["Phantom_000"], "val": ["Phantom_001"], "test": [],
                                                "method": "explicit", "seed": 0}))
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(phantom_dir), "--output", str(out),
                 "--run", str(run)]) == 0
    printed = capsys.readouterr()
    assert "WARNING" not in printed.err and "held-out volume Dice mean" in printed.out

    with open(out / "cases.csv") as fh:
        cases = {row["case"]: row for row in csv.DictReader(fh)}
    assert {n: r["group"] for n, r in cases.items()} == {"Phantom_000": "train", "Phantom_001": "val",
                                                         "Phantom_002": "unseen"}
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["groups"]) == ["train", "val", "unseen"]
    assert [summary["groups"][g]["held_out"] for g in ("train", "val", "unseen")] == [False, False, True]
    assert "selection-biased" in summary["groups"]["val"]["role"]
    held = summary["held_out"]
    assert held["cases"] == ["Phantom_002"]
    assert held["metrics"]["dice"]["mean"] == pytest.approx(float(cases["Phantom_002"]["dice"]))
    assert held["metrics"]["dice"]["mean"] < summary["metrics"]["dice"]["mean"]  # the pool flatters
    assert summary["grouping"]["warning"] is None and summary["grouping"]["split"] == str(run / "split.json")
    report = (out / "report.md").read_text()
    assert "Held-out volume Dice" in report and "groups unknown" not in report
    assert re.search(r"\| val \| validation: picked the checkpoint", report)

    # the same run's split, held out explicitly as test, and a run folder without a split
    (run / "split.json").write_text(json.dumps({"train": ["Phantom_000", "Phantom_001"], "val": [],
                                                "test": ["Phantom_002"]}))
    summary = evaluate_predictions(pred_dir, phantom_dir, tmp_path / "eval2", split=run / "split.json")
    assert summary["held_out"]["cases"] == ["Phantom_002"] and set(summary["groups"]) == {"train", "test"}
    (run / "split.json").unlink()
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(phantom_dir),
                 "--output", str(tmp_path / "eval3"), "--run", str(run)]) == 2
    assert "no split.json" in capsys.readouterr().err


def test_without_a_split_the_report_says_groups_are_unknown(phantom_dir, tmp_path, capsys):
    pred_dir = tmp_path / "pred"
    _write_predictions(phantom_dir, pred_dir)
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred_dir), "--truth", str(phantom_dir), "--output", str(out)]) == 0
    assert "WARNING: groups unknown" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"] is None and list(summary["groups"]) == ["all"]
    assert summary["groups"]["all"]["held_out"] is None
    assert summary["grouping"]["split"] is None and "training cases" in summary["grouping"]["warning"]
    report = (out / "report.md").read_text()
    assert "**Warning: groups unknown" in report and "Held-out volume Dice" not in report


def test_false_positive_only_slice_counts_and_is_the_worst(phantom_dir, tmp_path):
    empty_slice = {}

    def edit(name, mask, affine):
        if name == "Phantom_000":
            mask = mask.copy()
            k = int(np.flatnonzero(~mask.any(axis=(1, 2)))[0])
            mask[k, 10:20, 10:20] = 1  # 100 pixels on a slice with no truth
            empty_slice[name] = k
        return mask, affine

    pred_dir = tmp_path / "pred"
    truths = _write_predictions(phantom_dir, pred_dir, edit)
    out = tmp_path / "eval"
    summary = evaluate_predictions(pred_dir, phantom_dir, out, empty_threshold=10)
    k = empty_slice["Phantom_000"]

    with open(out / "slices.csv") as fh:
        slices = list(csv.DictReader(fh))
    row = next(r for r in slices if r["case"] == "Phantom_000" and int(r["slice"]) == k)
    assert float(row["dice"]) == 0.0 and row["counted"] == "1" and row["truth_pixels"] == "0"
    truth_slices = sum(int(t.any(axis=(1, 2)).sum()) for t in truths.values())
    all_slices = sum(t.shape[0] for t in truths.values())
    sd = summary["slice_dice"]
    assert sd["n"] == truth_slices + 1 and sd["false_positive_only"] == 1
    assert sd["empty_in_both_excluded"] == all_slices - truth_slices - 1
    assert sd["min"] == 0.0  # everything else is a perfect copy of the truth
    assert sum(r["counted"] == "1" for r in slices) == sd["n"]
    assert all(float(r["dice"]) == 1.0 for r in slices if r["counted"] == "0")

    from ctseg.evaluate.evaluate import evaluate_case
    case = next(c for c in discover_cases(phantom_dir) if c.name == "Phantom_000")
    titles = [title for title, *_ in evaluate_case(case, pred_dir / "Phantom_000.nii.gz").gallery]
    assert titles[-1] == f"worst: slice {k}, Dice 0.000"
    assert titles[0].startswith("best:") and "Dice 1.000" in titles[0]
    assert "predicted something without truth (1, Dice 0)" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def tiny_runs(phantom_dir, tmp_path_factory) -> list[Path]:
    """Two real one-epoch runs (UNet, residual-attention UNet) on the phantom, MLflow off."""
    from ctseg.train import train

    root = tmp_path_factory.mktemp("runs")
    config = {"data": {"size": [32, 32], "cache_dir": str(root / "cache")},
              "model": {"features": [4, 8]}, "split": {"val_fraction": 0.34},
              "train": {"epochs": 2, "batch_size": 8, "slices_per_epoch": 16}, "tracking": {"enabled": False}}
    runs = []
    for network in ("unet", "unet_ra"):
        config["model"]["name"] = network
        runs.append(train(config, phantom_dir, root / network))
    return runs


def test_compare_two_runs(tiny_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, tiny_runs), "--output", str(out)]) == 0
    assert "| unet_ra |" in capsys.readouterr().out
    with open(out / "compare.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["network"] for r in rows] == ["unet", "unet_ra"]
    for row, run in zip(rows, tiny_runs):
        recorded = json.loads((run / "metrics.json").read_text())
        assert row["dice_source"] == "measured" and row["epochs"] == "2"
        # measured through the predictor on the validation case: the Dice training recorded
        assert float(row["dice"]) == pytest.approx(recorded["best_val_dice"], abs=1e-6)
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["ms_per_slice"]) > 0
        assert int(row["params"]) > 0
        assert float(row["param_mb"]) == pytest.approx(int(row["params"]) * 4 / 2**20)
        assert float(row["checkpoint_mb"]) == pytest.approx((run / "checkpoints" / "best.pt").stat().st_size / 2**20)
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 2 + 2  # header, separator, one row per run


def test_compare_reads_a_run_made_before_run_records(tiny_runs, phantom_dir, tmp_path):
    """A run saved before run.json kept its case and cache folders in its config (config.yaml and
    checkpoints): compare still finds its validation cases there, and loading it hands on no
    local path."""
    import shutil

    import torch
    import yaml

    from ctseg.infer.model_loader import load_model
    from ctseg.study.compare import compare_runs
    from ctseg.train.run_record import RUN_RECORD, read_run_record

    old = tmp_path / "old_run"
    shutil.copytree(tiny_runs[0], old)
    cache_dir = read_run_record(old).cache_dir
    (old / RUN_RECORD).unlink()
    locations = {"case_dir": str(Path(phantom_dir).resolve()), "cache_dir": cache_dir}
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["data"].update(locations)
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    for ckpt in (old / "checkpoints").glob("*.pt"):
        state = torch.load(ckpt, weights_only=True)
        state["config"]["data"].update(locations)
        torch.save(state, ckpt)

    assert read_run_record(old).case_dir == locations["case_dir"]
    assert load_model(old, "cpu").config["data"]["case_dir"] is None
    row, = compare_runs([old], device="cpu", repeats=1)
    recorded = json.loads((old / "metrics.json").read_text())
    assert row["dice_source"] == "measured"
    assert row["dice"] == pytest.approx(recorded["best_val_dice"], abs=1e-6)


def test_report_training_curves(tiny_runs):
    assert main(["report", str(tiny_runs[0])]) == 0
    report = tiny_runs[0] / "report" / "report.md"
    assert "training_curves.png" in report.read_text()
    val = json.loads((tiny_runs[0] / "split.json").read_text())["val"]
    assert f"best_val_dice is selection-biased: the validation case(s) ({', '.join(val)})" in report.read_text()
    _assert_png(tiny_runs[0] / "report" / "training_curves.png")
    assert report.read_text().count("\n| ") >= 2 + 2  # header, separator, one row per epoch
