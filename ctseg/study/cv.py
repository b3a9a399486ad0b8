"""Patient-level K-fold cross-validation: `ctseg cv` / `make cv`.

Why: a run's validation case also picks its checkpoint (and, with `train.selection: best`, its LR
schedule and when it stops), so its Dice is selection-biased and must not be called held-out.
Here every case is a test case exactly once, in the fold that never saw it:

- folds: the case names shuffled by `split.seed` and cut into K parts (`ctseg.data.split`'s
  k-fold); K defaults to leave-one-case-out up to 5 cases, else 5;
- each fold is a normal training run (`fold_<k>/`). Its `split.json` lists the test case(s) under
  `test`, which the trainer never loads: checkpoint choice, LR and early stopping come from an
  inner validation split of the fold's training cases (`split.val_fraction`, when the fold has
  at least 2 training cases) or, with one training case, `split.val_fraction: 0` or
  `train.selection: last`, from nothing: a fixed-length run whose last epoch is kept. The fold's
  `cv_fold.json` says which (`selection`);
- the kept checkpoint then segments the fold's test cases through `ctseg predict`'s path
  (`predictions/<case>.nii.gz`) and `ctseg evaluate`'s scoring reads them back.

Outputs: `cv.csv` (one row per test case), `summary.json` (mean, sd, median, min, max over
cases of each metric; per-fold rows), `cv_dice.png`, `cv_plan.json`, and an MLflow parent run
(this folder) to which each fold's run is attached as a nested run with its test metrics.
Rerunning the same command resumes: a fold with `cv_fold.json` is not retrained, an interrupted
fold continues from its `checkpoints/last.pt`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ctseg import distributed
from ctseg.config import config_view, resolve_config, save_config
from ctseg.data import discover_cases
from ctseg.data.cache import load_case_volume
from ctseg.data.cases import Case
from ctseg.data.phantom import ensure_phantom
from ctseg.data.split import make_split
from ctseg.errors import ConfigError, MaskError
from ctseg.evaluate.evaluate import evaluate_case, summarize
from ctseg.infer.cases import output_path
from ctseg.infer.model_loader import LAST, load_model
from ctseg.infer.postprocess import case_body, postprocess_labels, postprocess_steps
from ctseg.infer.volume import predict_volume
from ctseg.io import save_nifti
from ctseg.train import train
from ctseg.train.tracking import TRACKING_FILE, Tracker, tracking_uri
from ctseg.transforms import num_classes
from ctseg.utils import atomic_path, atomic_write_text, pick_device

logger = logging.getLogger(__name__)

#: Scored per test case (keys of `ctseg.evaluate.metrics.segmentation_metrics`).
METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "nsd")
CSV_COLUMNS = ("fold", "case", *METRICS, "selection", "epochs", "train_seconds")
#: Leave-one-case-out up to this many cases; above it, this many folds.
MAX_DEFAULT_FOLDS = 5
PLAN, FOLD_DONE = "cv_plan.json", "cv_fold.json"


def default_folds(n_cases: int) -> int:
    return n_cases if n_cases <= MAX_DEFAULT_FOLDS else MAX_DEFAULT_FOLDS


def plan_folds(names: list[str], folds: int, config: dict) -> list[dict]:
    """Each fold's test, training and inner validation cases and its `train.selection`.

    `config` is resolved; its `split.seed` shuffles the cases, `split.val_fraction` sizes the
    inner validation split (0: none), `train.selection: last` asks for fixed-length folds.
    """
    if len(names) < 2:
        raise ConfigError(f"cross-validation needs at least 2 labelled cases, found {len(names)}")
    if not 2 <= folds <= len(names):
        raise ConfigError(f"--folds must be between 2 and {len(names)} (the cases), got {folds}")
    cfg = config_view(config)
    seed, val_fraction = cfg.split.seed, cfg.split.val_fraction
    fixed = cfg.train.selection == "last"
    plan = []
    for k in range(folds):
        outer = make_split(names, {"seed": seed, "folds": folds, "fold": k})
        test, rest = outer["val"], outer["train"]
        if fixed or val_fraction <= 0 or len(rest) < 2:
            train_cases, val, selection = rest, [], "last"
        else:
            inner = make_split(rest, {"seed": seed, "val_fraction": val_fraction})
            train_cases, val, selection = inner["train"], inner["val"], "best"
        plan.append({"fold": k, "test": test, "train": train_cases, "val": val, "selection": selection})
    return plan


def fold_config(config: dict, fold: dict) -> dict:
    """The training config of one fold: its explicit split (test listed, never loaded) and selection."""
    out = copy.deepcopy(config)
    out["split"] = {"seed": config_view(config).split.seed, "train": fold["train"], "val": fold["val"],
                    "test": fold["test"]}
    out["train"]["selection"] = fold["selection"]
    return out


def run_cv(config: dict, case_dir: Path | None, output: Path, folds: int | None = None,
           device: str | None = None) -> dict:
    """Cross-validate `config` on the labelled cases of `case_dir` (None: the built-in phantom).

    Returns the summary also written to `output/summary.json`.
    """
    if distributed.launched():
        raise ConfigError("cv runs in one process, fold after fold; run it without torchrun "
                          "(--device picks the GPU)")
    output = Path(output)
    config = resolve_config(config)  # the schema checks train.selection with every other value
    _refuse_own_split(config)
    if case_dir is None:
        case_dir = Path(config_view(config).data.case_dir or ensure_phantom(config))
    case_dir = Path(case_dir).resolve()
    config["data"]["case_dir"] = str(case_dir)
    # One MLflow store for the cv run and its folds: the one `ctseg train --output` beside
    # OUTPUT would use (runs/mlflow.db for runs/cv-..., what `make mlflow-ui` opens).
    config["tracking"]["uri"] = tracking_uri(config, output.parent)
    cases = discover_cases(case_dir)
    unlabeled = [c.name for c in cases if c.label is None]
    if unlabeled:
        raise MaskError(f"{case_dir}: case(s) {unlabeled} have no mask; cross-validation needs one per case")
    by_name = {c.name: c for c in cases}
    k = int(folds) if folds is not None else default_folds(len(cases))
    plan = plan_folds(sorted(by_name), k, config)
    output.mkdir(parents=True, exist_ok=True)
    _check_or_write_plan(output, {"case_dir": str(case_dir), "folds": plan, "config": config})
    save_config(config, output / "config.yaml")

    parent = Tracker(config, output)  # the fold runs log to the same store (tracking.uri above)
    parent.start(config, resume=True)
    try:
        rows, fold_rows = [], []
        for fold in plan:
            done = _run_fold(config, case_dir, output, fold, k, by_name, device)
            rows += done["test"]
            fold_rows.append(_fold_summary(done))
            _attach_fold_run(parent, output / _fold_name(fold["fold"]), done)
        summary = _write_outputs(output, config, plan, rows, fold_rows)
        parent.log_metrics({f"cv_{m}_{s}": v for m in METRICS for s, v in summary["metrics"][m].items()
                            if s in ("mean", "sd", "min", "max") and v is not None and math.isfinite(v)},
                           step=0)
        for name in ("cv.csv", "summary.json", "cv_dice.png", PLAN):
            parent.log_artifact(output / name)
    except KeyboardInterrupt:
        parent.end("KILLED")
        raise
    except Exception:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    return summary


def _refuse_own_split(config: dict) -> None:
    split = config_view(config).split
    given = [key for key in ("train", "val", "test", "folds") if getattr(split, key)]
    if given or split.test_fraction > 0:
        keys = ", ".join(f"split.{key}" for key in given or ["test_fraction"])
        raise ConfigError(f"cv makes its own patient-level folds; remove {keys} from the config "
                          "(split.seed and split.val_fraction are used)")


def _fold_name(k: int) -> str:
    return f"fold_{k}"


def _check_or_write_plan(output: Path, plan: dict) -> None:
    """Resume only the same study: the same cases, folds and config, else refuse the folder."""
    path = output / PLAN
    plan = json.loads(json.dumps(plan))  # tuples as lists, as read back
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the cross-validation plan ({exc})") from exc
        for key, what in (("case_dir", "case folder"), ("folds", "folds"), ("config", "config")):
            if previous.get(key) != plan[key]:
                raise ConfigError(f"{output}: holds a cross-validation with another {what}; rerun it with the "
                                  "same arguments to resume, or choose another --output")
        return
    atomic_write_text(path, json.dumps(plan, indent=2) + "\n")


def _run_fold(config: dict, case_dir: Path, output: Path, fold: dict, k: int, by_name: dict[str, Case],
              device: str | None) -> dict:
    """Train (or resume) one fold and score its test cases; reuse the result of a finished fold."""
    fold_dir = output / _fold_name(fold["fold"])
    marker = fold_dir / FOLD_DONE
    where = (f"inner validation on {', '.join(fold['val'])}" if fold["selection"] == "best"
             else "fixed length, last epoch kept")
    if marker.is_file():
        logger.info("fold %d (%d of %d): already done (%s), not retrained", fold["fold"], fold["fold"] + 1, k,
                    marker)
        return json.loads(marker.read_text())
    logger.info("fold %d (%d of %d): test %s; training on %s (%s)", fold["fold"], fold["fold"] + 1, k,
                ", ".join(fold["test"]), ", ".join(fold["train"]), where)
    resume = fold_dir if (fold_dir / "checkpoints" / LAST).is_file() else None
    train(fold_config(config, fold), case_dir=case_dir, output=fold_dir, device=device, resume=resume)
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    rows = _score_test_cases(fold["fold"], fold_dir, [by_name[n] for n in fold["test"]],
                             output / "predictions", device)
    for row in rows:
        row.update(selection=fold["selection"], epochs=metrics["epochs"], train_seconds=metrics["train_seconds"])
    done = {**fold, "test_cases": fold["test"], "test": rows, "epochs": metrics["epochs"],
            "best_epoch": metrics["best_epoch"], "train_seconds": metrics["train_seconds"],
            "inner_val_dice": metrics.get("best_val_dice")}
    atomic_write_text(marker, json.dumps(_finite(done), indent=2) + "\n")
    logger.info("fold %d (%d of %d): test Dice %s", fold["fold"], fold["fold"] + 1, k,
                ", ".join(f"{r['case']} {r['dice']:.4f}" for r in rows))
    return json.loads(marker.read_text())


def _score_test_cases(fold: int, fold_dir: Path, cases: list[Case], pred_dir: Path,
                      device: str | None) -> list[dict]:
    """Segment the fold's test cases as `ctseg predict` does and score the written masks as
    `ctseg evaluate` does (so `ctseg evaluate --pred OUTPUT/predictions` reproduces cv.csv)."""
    loaded = load_model(fold_dir, pick_device(device))
    n_classes = num_classes(loaded.config)
    steps = postprocess_steps(loaded.config, n_classes)
    dev = next(loaded.model.parameters()).device
    rows = []
    for case in cases:
        volume = load_case_volume(case)
        labels, _ = predict_volume(loaded.model, volume.array, loaded.config, dev, spacing_yx=volume.spacing[1:])
        path = output_path(pred_dir, case.name)
        labels = postprocess_labels(labels, steps, case_body(loaded.config, volume.array))
        save_nifti(labels, volume.affine, path, kind="label")
        result = evaluate_case(case, path, group="test", num_classes=n_classes)
        rows.append({"fold": fold, "case": case.name,
                     **{m: float(result.metrics[m]) for m in METRICS}})
    return rows


def _fold_summary(done: dict) -> dict:
    dice = [r["dice"] for r in done["test"]]
    return {key: done[key] for key in ("fold", "test_cases", "train", "val", "selection", "epochs",
                                        "best_epoch", "train_seconds", "inner_val_dice")} | {
        "test_dice_mean": float(np.mean(dice))}


def _attach_fold_run(parent: Tracker, fold_dir: Path, done: dict) -> None:
    """Nest the fold's MLflow run under the parent run and add its test metrics (best-effort)."""
    info_path = fold_dir / TRACKING_FILE
    if parent.run_id is None or parent.client is None or not info_path.is_file():
        return
    try:
        info = json.loads(info_path.read_text())
        if info.get("tracking_uri") != parent.uri:
            return
        parent.client.set_tag(info["run_id"], "mlflow.parentRunId", parent.run_id)
        for row in done["test"]:
            for m in METRICS:
                if row[m] is not None and math.isfinite(row[m]):
                    name = f"test_{m}" if len(done["test"]) == 1 else f"test_{m}_{row['case']}"
                    parent.client.log_metric(info["run_id"], name, row[m])
    except Exception as exc:  # tracking is not essential: the folder has every result
        logger.warning("MLflow: could not attach %s to the cv run (%s: %s)", fold_dir.name,
                       type(exc).__name__, exc)


def _write_outputs(output: Path, config: dict, plan: list[dict], rows: list[dict],
                   fold_rows: list[dict]) -> dict:
    stats = summarize(rows, METRICS)
    for m in METRICS:
        finite = [r[m] for r in rows if r[m] is not None and math.isfinite(r[m])]
        stats[m]["max"] = float(max(finite)) if finite else None
    worst = min(rows, key=lambda r: r["dice"])
    summary = {
        "method": ("leave-one-case-out" if all(len(f["test"]) == 1 for f in plan)
                   else f"{len(plan)}-fold, patient-level"),
        "folds": len(plan),
        "cases": len(rows),
        "seed": config_view(config).split.seed,
        "note": ("each case is scored once, by the fold that never loaded it; checkpoint, LR and "
                 "stopping came only from that fold's training cases. mean/sd/median/min/max are "
                 "over cases (sd: sample)."),
        "metrics": stats,
        "worst_case": {"case": worst["case"], "fold": worst["fold"], "dice": worst["dice"]},
        "per_fold": fold_rows,
    }
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v))
                         for k, v in row.items() if k in CSV_COLUMNS})
    atomic_write_text(output / "cv.csv", buffer.getvalue())
    atomic_write_text(output / "summary.json", json.dumps(_finite(summary), indent=2) + "\n")
    _dice_figure(rows, output / "cv_dice.png")
    return summary


def _dice_figure(rows: list[dict], path: Path) -> Path:
    """Per-case test Dice, one bar per case coloured by fold, the mean as a line."""
    fig = Figure(figsize=(max(4.0, 0.6 * len(rows) + 2), 3.2))
    ax = fig.add_subplot()
    dice = np.array([r["dice"] for r in rows], dtype=float)
    ax.bar(range(len(rows)), dice, color=[f"C{r['fold'] % 10}" for r in rows])
    ax.axhline(float(dice.mean()), color="0.3", linestyle="--", linewidth=1,
               label=f"mean {dice.mean():.4f} over {len(rows)} cases")
    ax.set_xticks(range(len(rows)), [f"{r['case']} (fold {r['fold']})" for r in rows], rotation=45,
                  ha="right", fontsize=7)
    ax.set_ylim(max(0.0, float(dice.min()) - 0.05), 1.0)
    ax.set_ylabel("test volume Dice")
    ax.set_title("Cross-validation: each case scored by the fold that never saw it")
    ax.legend(loc="best", fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _finite(obj):
    """JSON has no inf/NaN: null instead (an empty-mask HD95 is inf by convention)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
