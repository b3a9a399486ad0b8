"""`ctseg evaluate`: score predicted NIfTI masks against the labelled cases of a case folder.

Predictions are matched to cases by name (`PRED_DIR/<case>.nii.gz`) and must sit on exactly the
CT's voxel grid: a different shape or affine is refused, never resampled, because a resampled
Dice describes a different segmentation from the one the user would load in 3D Slicer.
Cases are grouped by what they did in training (`ctseg.evaluate.groups`): each group gets its own
means, and a held-out mean averages only cases that influenced nothing.
Per-slice figures count every slice with truth and every slice where the model predicted
something (a false-positive-only slice scores 0 and can be the worst); slices empty in both are
left out of the summary and the gallery, since their perfect 1 says nothing about the model.
When the folder holds `ctseg predict`'s `predictions.csv`, a case it lists as failed is reported
as failed and never scored, whatever NIfTI of that name is still there. Classes are 0..N-1 with N
from `--num-classes` (else the truth's largest label + 1); a label outside them in either mask is
an error naming the file, not a class silently added to the mean.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ctseg.errors import CTSegError, MaskError
from ctseg.evaluate import figures, groups as grouping
from ctseg.evaluate.metrics import (DEFAULT_EMPTY_THRESHOLD, DISTANCE_METRICS, OVERLAP_METRICS, segmentation_metrics,
                                   slice_dice)
from ctseg.io.masks import AFFINE_TOLERANCE
from ctseg.io.volume import CTVolume
from ctseg.outputs import check_writable_dir
from ctseg.utils import atomic_write_text, csv_cell, csv_uncell, log_text

log = logging.getLogger(__name__)

#: Columns of cases.csv before the metrics.
CASE_COLUMNS = ("case", "group", "slices", "spacing_z_mm", "spacing_y_mm", "spacing_x_mm")
#: The table `ctseg predict` writes beside its masks (`ctseg.infer.predict.CSV_NAME`).
PREDICTIONS_CSV = "predictions.csv"
SLICE_COLUMNS = ("case", "group", "slice", "position_mm", "dice", "truth_pixels", "pred_pixels", "counted")


@dataclass
class CaseResult:
    """Everything the report needs about one case; CT kept only for the three gallery slices."""

    name: str
    group: str
    spacing: tuple[float, float, float]
    metrics: dict[str, float]
    positions_mm: np.ndarray
    dice: np.ndarray
    truth_pixels: np.ndarray
    pred_pixels: np.ndarray
    counted: np.ndarray
    gallery: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def load_prediction(path: Path, reference: CTVolume, tolerance: float = AFFINE_TOLERANCE) -> np.ndarray:
    """Predicted labels (z, y, x) uint8, refused unless on exactly `reference`'s voxel grid."""
    from ctseg.io import load_nifti

    pred = load_nifti(path)
    if pred.shape != reference.shape:
        raise MaskError(f"{path}: prediction shape {pred.shape} (z, y, x) differs from the CT "
                        f"{reference.shape}; predictions must be written on the CT grid")
    diff = float(np.max(np.abs(pred.affine - reference.affine)))
    if diff > tolerance:
        raise MaskError(f"{path}: prediction affine differs from the CT's by up to {diff:.4g} mm "
                        f"(tolerance {tolerance} mm); refusing to resample.\n"
                        f"prediction:\n{np.array2string(pred.affine, precision=4)}\n"
                        f"CT:\n{np.array2string(reference.affine, precision=4)}")
    labels = pred.array
    if not np.all(np.rint(labels) == labels) or (labels.size and labels.min() < 0):
        raise MaskError(f"{path}: prediction holds non-integer or negative values; expected a label map")
    if labels.size and labels.max() > 255:
        raise MaskError(f"{path}: prediction labels up to {labels.max():.0f} do not fit a label map")
    return labels.astype(np.uint8)


def slice_positions(volume: CTVolume) -> np.ndarray:
    """Signed position (mm) of each slice along the slice normal, as DICOM SliceLocation reads."""
    k = np.arange(volume.shape[0], dtype=np.float64)
    centres = volume.affine[:3, 3][None, :] + k[:, None] * volume.affine[:3, 2][None, :]
    normal = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    return centres @ normal


def evaluate_case(
    case, pred_path: Path, *, group: str = "all", tolerance_mm: float = 2.0,
    empty_threshold: int = DEFAULT_EMPTY_THRESHOLD, num_classes: int | None = None,
) -> CaseResult:
    """Metrics, per-slice Dice and the best/median/worst gallery for one labelled `ctseg.data.Case`."""
    from ctseg.data.cache import load_case_volume
    from ctseg.io import load_mask

    volume = load_case_volume(case)
    truth = load_mask(case.label, volume)
    pred = load_prediction(pred_path, volume)
    n_classes = num_classes or max(2, int(truth.max()) + 1 if truth.size else 2)
    for path, labels, what in ((case.label, truth, "truth"), (pred_path, pred, "prediction")):
        if labels.size and int(labels.max()) >= n_classes:
            outside = sorted(int(v) for v in np.unique(labels) if v >= n_classes)
            raise MaskError(f"{log_text(path)}: {what} labels {outside} are outside the classes 0..{n_classes - 1} "
                            + ("given by --num-classes" if num_classes else "of the truth mask; pass "
                               "--num-classes with the model's class count if the truth lacks a class"))
    metrics = segmentation_metrics(pred, truth, volume.spacing, num_classes=n_classes,
                                   tolerance_mm=tolerance_mm)
    dice = slice_dice(pred, truth, empty_threshold=empty_threshold, num_classes=n_classes)
    truth_pixels, pred_pixels = (truth > 0).sum(axis=(1, 2)), (pred > 0).sum(axis=(1, 2))
    result = CaseResult(
        name=case.name, group=group, spacing=tuple(float(s) for s in volume.spacing), metrics=metrics,
        positions_mm=slice_positions(volume), dice=dice, truth_pixels=truth_pixels, pred_pixels=pred_pixels,
        counted=counted_slices(truth_pixels, pred_pixels, empty_threshold),
    )
    for title, k in gallery_slices(dice, result.counted):
        result.gallery.append((f"{title}: slice {k}, Dice {dice[k]:.3f}",
                               volume.array[k].copy(), truth[k] > 0, pred[k] > 0))
    return result


def counted_slices(truth_pixels: np.ndarray, pred_pixels: np.ndarray, empty_threshold: int) -> np.ndarray:
    """Slices that say something about the model: truth on them, or a prediction the empty-slice
    rule counts (at least `empty_threshold` pixels, scored 0). Slices empty in both are not."""
    return (truth_pixels > 0) | ((pred_pixels > 0) & (pred_pixels >= empty_threshold))


def gallery_slices(dice: np.ndarray, counted: np.ndarray) -> list[tuple[str, int]]:
    """Best, median and worst of the counted slices (`counted_slices`).

    A false-positive-only slice scores 0 and so is the worst one shown; slices empty in both
    would always be "best" while showing nothing, so they are left out.
    """
    candidates = np.flatnonzero(counted)
    if candidates.size == 0:
        return []
    order = candidates[np.argsort(dice[candidates], kind="stable")]
    return [("best", int(order[-1])), ("median", int(order[len(order) // 2])), ("worst", int(order[0]))]


def summarize(rows: Iterable[Mapping[str, float]], keys: Iterable[str]) -> dict[str, dict]:
    """mean, sd (sample), median, min over finite values, and how many were not finite."""
    rows = list(rows)
    summary = {}
    for key in keys:
        values = np.array([row[key] for row in rows if key in row], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[key] = {
            "mean": float(finite.mean()) if finite.size else None,
            "sd": float(finite.std(ddof=1)) if finite.size > 1 else None,
            "median": float(np.median(finite)) if finite.size else None,
            "min": float(finite.min()) if finite.size else None,
            "n": int(finite.size),
            "non_finite": int(values.size - finite.size),
        }
    return summary


def match_predictions(pred_dir: Path, truth_dir: Path) -> tuple[list[tuple], list[str], list[str]]:
    """(case, prediction path) for every labelled case with a prediction.

    Also returns predictions without a labelled case and labelled cases without a prediction,
    which the report lists rather than silently dropping.
    """
    from ctseg.data import discover_cases

    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    if not pred_dir.is_dir():
        raise CTSegError(f"{pred_dir}: prediction folder not found")
    preds = {p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem: p
             for p in sorted(pred_dir.iterdir()) if p.is_file() and p.name.endswith((".nii", ".nii.gz"))}
    cases = {case.name: case for case in discover_cases(truth_dir) if case.label is not None}
    matched = [(case, preds[name]) for name, case in cases.items() if name in preds]
    unmatched_preds = sorted(set(preds) - set(cases))
    missing_preds = sorted(set(cases) - set(preds))
    if not matched:
        raise CTSegError(
            f"no prediction in {pred_dir} matches a labelled case in {truth_dir} by name "
            f"(predictions: {log_text(', '.join(sorted(preds)[:5])) or 'none'}; "
            f"cases: {log_text(', '.join(sorted(cases)[:5])) or 'none'})")
    return matched, unmatched_preds, missing_preds


def read_prediction_status(pred_dir: Path) -> dict[str, str]:
    """Case -> status from `ctseg predict`'s predictions.csv in `pred_dir` ({} when there is none)."""
    path = Path(pred_dir) / PREDICTIONS_CSV
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CTSegError(f"{log_text(path)}: cannot read the prediction table ({exc})") from exc
    if rows and not {"case", "status"} <= set(rows[0]):
        raise CTSegError(f"{log_text(path)}: expected columns 'case' and 'status'")
    return {csv_uncell(row["case"]): row["status"] for row in rows if row.get("case")}


def evaluate_predictions(
    pred_dir: Path, truth_dir: Path, output: Path, *, tolerance_mm: float = 2.0,
    empty_threshold: int = DEFAULT_EMPTY_THRESHOLD, split: Path | None = None,
    num_classes: int | None = None, run: Path | None = None,
) -> dict:
    """Score every matched case and write cases.csv, slices.csv, summary.json, report.md + PNGs.

    `run` (a run folder) or `split` (its split.json) groups the cases by what they did in
    training; without either the summary says the groups are unknown. Returns the summary (also
    written as summary.json).
    """
    output = check_writable_dir(output)
    status = read_prediction_status(pred_dir)
    matched, unmatched_preds, missing_preds = match_predictions(pred_dir, truth_dir)
    labelled = {case.name for case, _ in matched} | set(missing_preds)
    failed = sorted(name for name, s in status.items() if s != "ok" and name in labelled)
    matched = [(case, path) for case, path in matched if case.name not in failed]
    missing_preds = [name for name in missing_preds if name not in failed]
    if not matched:
        raise CTSegError(f"{log_text(pred_dir)}: no prediction to score: predictions.csv lists "
                         f"{log_text(', '.join(failed))} as failed")
    split = grouping.split_path(run, split)
    groups = grouping.load_split_groups(split) if split else {}
    for name in failed:
        log.warning("case %s failed in ctseg predict (predictions.csv): reported as failed, not scored",
                    log_text(name))
    for name in unmatched_preds:
        log.warning("prediction %s has no labelled case in %s: not scored", log_text(name), log_text(truth_dir))
    for name in missing_preds:
        log.warning("labelled case %s has no prediction in %s: not scored", log_text(name), log_text(pred_dir))

    fig_dir = output / "figures"
    results: list[CaseResult] = []
    figure_paths: dict[str, list[Path]] = {"slice_dice": [], "gallery": []}
    for case, pred_path in matched:
        name = case.name
        log.info("evaluating %s", log_text(name))
        group = grouping.case_group(name, groups)
        result = evaluate_case(case, pred_path, group=group, tolerance_mm=tolerance_mm,
                               empty_threshold=empty_threshold, num_classes=num_classes)
        figure_paths["slice_dice"].append(figures.slice_dice_plot(
            name, result.positions_mm, result.dice, result.truth_pixels > 0, empty_threshold,
            fig_dir / f"slice_dice_{name}.png", counted=result.counted))
        if result.gallery:
            figure_paths["gallery"].append(figures.slice_gallery(
                name, result.gallery, result.spacing[1:], fig_dir / f"slices_{name}.png"))
        result.gallery = []  # the CT slices are no longer needed
        results.append(result)

    histogram = figures.dice_histogram(
        {g: values for g in grouping.ordered(r.group for r in results)
         if (values := np.concatenate([r.dice[r.counted] for r in results if r.group == g])).size},
        fig_dir / "slice_dice_histogram.png", title="Per-slice Dice (slices empty in both left out)")

    metric_keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    summary = {
        "cases": len(results),
        "tolerance_mm": tolerance_mm,
        "empty_threshold_pixels": empty_threshold,
        "empty_slice_rule": ("per-slice Dice is 1 when truth is empty and the prediction has no pixels "
                             f"or fewer than {empty_threshold}; 0 when truth is empty and it has more"),
        "metrics": summarize((r.metrics for r in results), metric_keys),
        "slice_dice": _slice_summary(results),
        "unmatched_predictions": unmatched_preds,
        "cases_without_prediction": missing_preds,
        "failed_predictions": failed,
    }
    summary.update(_grouped(results, metric_keys, split))
    if not groups:
        log.warning("%s", grouping.POOLED_WARNING)

    atomic_write_text(output / "cases.csv", _csv(
        list(CASE_COLUMNS) + metric_keys,
        ({"case": r.name, "group": r.group, "slices": len(r.dice), "spacing_z_mm": r.spacing[0],
          "spacing_y_mm": r.spacing[1], "spacing_x_mm": r.spacing[2], **r.metrics} for r in results)))
    atomic_write_text(output / "slices.csv", _csv(
        SLICE_COLUMNS,
        ({"case": r.name, "group": r.group, "slice": k, "position_mm": round(float(r.positions_mm[k]), 3),
          "dice": float(r.dice[k]), "truth_pixels": int(r.truth_pixels[k]), "pred_pixels": int(r.pred_pixels[k]),
          "counted": int(r.counted[k])}
         for r in results for k in range(len(r.dice)))))
    atomic_write_text(output / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    atomic_write_text(output / "report.md", _report(summary, results, metric_keys, figure_paths, histogram,
                                                    output, Path(pred_dir), Path(truth_dir)))
    return summary


def _slice_summary(results: list[CaseResult]) -> dict:
    """Per-slice Dice summary over the counted slices, with how many slices were left out and why."""
    out = summarize(({"dice": float(d)} for r in results for d in r.dice[r.counted]), ["dice"])["dice"]
    out["false_positive_only"] = int(sum(((r.truth_pixels == 0) & r.counted).sum() for r in results))
    out["empty_in_both_excluded"] = int(sum((~r.counted).sum() for r in results))
    return out


def _grouped(results: list[CaseResult], metric_keys: list[str], split: Path | None) -> dict:
    """Summary entries per group (train, val, test, unseen; or one pooled `all` without a split)
    and the held-out summary, which averages only the groups that influenced nothing."""
    def block(members: list[CaseResult]) -> dict:
        return {"cases": [r.name for r in members],
                "metrics": summarize((r.metrics for r in members), metric_keys),
                "slice_dice": _slice_summary(members)}

    groups = {}
    for g in grouping.ordered(r.group for r in results):
        groups[g] = {"role": grouping.role(g), "held_out": grouping.is_held_out(g),
                     **block([r for r in results if r.group == g])}
    held_out = [r for r in results if grouping.is_held_out(r.group)]
    return {
        "grouping": {"split": str(split) if split else None,
                     "held_out_groups": list(grouping.HELD_OUT_GROUPS) if split else [],
                     "warning": None if split else grouping.POOLED_WARNING},
        "groups": groups,
        "held_out": block(held_out) if held_out else None,
    }


def format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        return f"{value:.4f}"
    return str(value)


def _csv(columns: Iterable[str], rows: Iterable[Mapping]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else csv_cell(v) if isinstance(v, str) else v)
                         for k, v in row.items()})
    return buffer.getvalue()


def _json_safe(value):
    """JSON has no NaN/inf: they become null (summaries count non-finite values separately)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _counted_note(summary: dict) -> str:
    """One sentence on which slices the per-slice figures count."""
    sd = summary["slice_dice"]
    return (f"{sd['n']} slices: those with truth and those where the model predicted something "
            f"without truth ({sd['false_positive_only']}, Dice 0); {sd['empty_in_both_excluded']} "
            "slices empty in both are left out")


def _group_lines(summary: dict) -> list[str]:
    """The report's per-group table and the held-out line (or why there is none)."""
    lines = ["", "## By group (what each case did in training)", "",
             "| group | role | cases | volume Dice mean | worst case Dice | per-slice Dice mean |",
             "| --- | --- | --- | --- | --- | --- |"]
    for g, s in summary["groups"].items():
        dice = s["metrics"].get("dice", {})
        lines.append(f"| {g} | {s['role']} | {len(s['cases'])} | {format_value(dice.get('mean'))} "
                     f"| {format_value(dice.get('min'))} | {format_value(s['slice_dice']['mean'])} |")
    held = summary["held_out"]
    if held is not None:
        dice = held["metrics"].get("dice", {})
        lines.append(f"\n**Held-out volume Dice** ({len(held['cases'])} case(s) that influenced nothing: "
                     f"{', '.join(held['cases'])}): mean {format_value(dice.get('mean'))}, sd {format_value(dice.get('sd'))}, "
                     f"worst {format_value(dice.get('min'))}.")
    elif not summary["grouping"]["warning"]:
        lines.append("\n**No held-out case**: every scored case was trained on or picked the checkpoint; "
                     "no figure here estimates performance on new patients.")
    return lines


def _report(summary: dict, results: list[CaseResult], metric_keys: list[str],
            figure_paths: dict[str, list[Path]], histogram: Path, output: Path,
            pred_dir: Path, truth_dir: Path) -> str:
    rel = lambda p: Path(p).relative_to(output).as_posix()  # noqa: E731
    lines = [
        "# Segmentation evaluation", "",
        f"- predictions: `{pred_dir}`", f"- truth: `{truth_dir}`",
        f"- cases scored: {summary['cases']}",
        f"- surface tolerance for NSD: {summary['tolerance_mm']} mm; distances in mm from the CT spacing",
        f"- per-slice rule: {summary['empty_slice_rule']} (threshold {summary['empty_threshold_pixels']} pixels)",
    ]
    if summary["unmatched_predictions"]:
        lines.append(f"- predictions without a labelled case (not scored): {', '.join(summary['unmatched_predictions'])}")
    if summary["failed_predictions"]:
        lines.append(f"- cases that failed in `ctseg predict` (not scored): {', '.join(summary['failed_predictions'])}")
    if summary["cases_without_prediction"]:
        lines.append(f"- labelled cases without a prediction (not scored): {', '.join(summary['cases_without_prediction'])}")
    lines.append(f"- per-slice figures count {_counted_note(summary)}")
    if summary["grouping"]["warning"]:
        lines += ["", f"> **Warning: {summary['grouping']['warning']}.**"]
    else:
        lines.append(f"- groups from `{summary['grouping']['split']}`; held out: "
                     f"{' and '.join(summary['grouping']['held_out_groups'])} cases only")
    lines += ["", "## Summary over all scored cases" + (" (pooled: train, val and test mixed)"
                                                       if len(summary["groups"]) > 1 else ""), "",
              "| metric | mean | sd | median | min | n | non-finite |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, s in summary["metrics"].items():
        lines.append(f"| {key} | {format_value(s['mean'])} | {format_value(s['sd'])} | {format_value(s['median'])} | {format_value(s['min'])} "
                     f"| {s['n']} | {s['non_finite']} |")
    sd = summary["slice_dice"]
    lines.append(f"| per-slice Dice (counted slices) | {format_value(sd['mean'])} | {format_value(sd['sd'])} | {format_value(sd['median'])} "
                 f"| {format_value(sd['min'])} | {sd['n']} | {sd['non_finite']} |")
    lines += _group_lines(summary)
    shown = [k for k in OVERLAP_METRICS + DISTANCE_METRICS if k in metric_keys]
    lines += ["", "## Per case", "", "| case | group | slices | " + " | ".join(shown) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in shown) + " |"]
    for r in results:
        lines.append(f"| {r.name} | {r.group} | {len(r.dice)} | " + " | ".join(format_value(r.metrics[k]) for k in shown) + " |")
    lines += ["", "Full values: `cases.csv`, `slices.csv`, `summary.json`.", "", "## Figures", "",
              "### Per-slice Dice histogram", "", f"![per-slice Dice histogram]({rel(histogram)})", "",
              "### Per-slice Dice along the scan", ""]
    lines += [f"![{p.stem}]({rel(p)})" for p in figure_paths["slice_dice"]]
    lines += ["", "### Best, median and worst slices (truth green, prediction red)", ""]
    lines += [f"![{p.stem}]({rel(p)})" for p in figure_paths["gallery"]]
    return "\n".join(lines) + "\n"
