"""`ctseg report RUN_DIR`: a run's training curves (from history.csv) as PNG + Markdown."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml

from ctseg.config import config_view
from ctseg.errors import ModelError
from ctseg.evaluate import figures
from ctseg.utils import atomic_write_text


def read_history(path: Path) -> dict[str, np.ndarray]:
    """history.csv as float columns (empty cells become NaN)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read training history ({exc.strerror or exc})") from exc
    if not rows or "epoch" not in rows[0]:
        raise ModelError(f"{path}: no epochs recorded (expected a header with 'epoch' and one row per epoch)")

    def number(text: str | None) -> float:
        try:
            return float(text) if text not in (None, "") else math.nan
        except ValueError:
            return math.nan

    return {key: np.array([number(row.get(key)) for row in rows]) for key in rows[0]}


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(config, metrics) of a run folder; either may be empty when the file is absent."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"{run_dir}: run folder not found")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return config or {}, metrics


def write_run_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write `training_curves.png` and `report.md` (default: RUN_DIR/report/); returns report.md."""
    run_dir = Path(run_dir)
    config, metrics = read_run(run_dir)
    history = read_history(run_dir / "history.csv")
    output = Path(output) if output else run_dir / "report"
    cfg = config_view(config, str(run_dir / "config.yaml")) if config else None
    network = cfg.model.name if cfg else "?"
    curves = figures.training_curves(history, output / "training_curves.png",
                                     title=f"{run_dir.name} ({network})")
    lines = [f"# Training report: {run_dir.name}", "", f"- run folder: `{run_dir}`", f"- network: {network}"]
    for key in ("best_val_dice", "best_epoch", "epochs", "train_seconds", "slices_per_second"):
        if key in metrics:
            value = metrics[key]
            lines.append(f"- {key}: {value:.4f}" if isinstance(value, float) else f"- {key}: {value}")
    lines += _split_lines(run_dir, metrics, cfg.train.selection if cfg else "best")
    lines += ["", f"![training curves]({curves.name})", "", "## History", ""]
    keys = list(history)
    lines += ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    for i in range(len(history["epoch"])):
        lines.append("| " + " | ".join(_cell(history[k][i]) for k in keys) + " |")
    report = output / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report


def _split_lines(run_dir: Path, metrics: dict, selection: str) -> list[str]:
    """What the validation Dice is and is not: its cases picked the checkpoint, so it is not held out."""
    try:
        split = json.loads((run_dir / "split.json").read_text())
    except (OSError, ValueError):
        split = {}
    split = split if isinstance(split, dict) else {}
    val, test = split.get("val") or [], split.get("test") or []
    lines = []
    if "best_val_dice" in metrics and selection == "last":
        lines.append(f"- the last epoch was kept (train.selection: last); the validation case(s) "
                     f"({', '.join(val) or 'none'}) may still have driven the LR schedule or stopping, "
                     "so best_val_dice is not a held-out figure")
    elif "best_val_dice" in metrics:
        lines.append(f"- best_val_dice is selection-biased: the validation case(s) ({', '.join(val) or 'see split.json'}) "
                     "picked the best checkpoint, so it is not a held-out figure")
    if test:
        lines.append(f"- held-out test case(s), never loaded by training: {', '.join(test)}; score them with "
                     f"`ctseg evaluate --run {run_dir}`")
    return lines


def _cell(value: float) -> str:
    if math.isnan(value):
        return ""
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"
