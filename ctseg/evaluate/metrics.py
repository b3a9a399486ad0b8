"""Segmentation metrics in physical units, computed with MONAI's metric functions.

One implementation serves the training loop (every epoch, `distances=False`) and `ctseg evaluate`
(full set), so the Dice a user sees during training is the Dice the report shows.

Conventions
- `pred` and `truth` are integer label volumes (z, y, x) of identical shape; `spacing` is (z, y, x)
  in mm, so distances are millimetres even for anisotropic CT (e.g. 3 mm slices, 0.98 mm pixels).
- Only foreground classes 1..num_classes-1 are scored. Each class is passed to MONAI as a single
  boolean channel (never a full one-hot volume), which keeps a 512x512x150 case cheap on CPU.
- Empty masks: a class absent from both masks is not scored: its Dice, IoU, precision, recall,
  NSD, HD95 and ASSD are NaN (as MONAI's `ignore_empty`) and class means leave it out, so a
  label nobody drew cannot lift a mean by counting as a perfect 1. Exactly one empty -> Dice, IoU
  and NSD are 0, HD95/ASSD are `inf` (no surface to measure to), precision is NaN when nothing
  was predicted, recall NaN when the truth is empty (their denominators are zero). Summaries
  must therefore treat non-finite values explicitly (`ctseg evaluate` reports how many there are).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_hausdorff_distance,
    compute_surface_dice,
    get_confusion_matrix,
)

from ctseg.errors import MaskError

#: The per-class metrics `segmentation_metrics` returns (plus `<name>_<class>` keys when there is
#: more than one foreground class); distance metrics only with `distances=True`.
OVERLAP_METRICS = ("dice", "iou", "precision", "recall", "accuracy")
DISTANCE_METRICS = ("hd95_mm", "assd_mm", "nsd")
VOLUME_METRICS = ("truth_ml", "pred_ml")

#: Default pixel count below which a prediction on a slice with empty truth counts as empty.
DEFAULT_EMPTY_THRESHOLD = 10


def _check_pair(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise MaskError(f"prediction shape {pred.shape} does not match truth shape {truth.shape}")
    if num_classes < 2:
        raise MaskError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    for name, arr in (("prediction", pred), ("truth", truth)):
        if arr.dtype.kind not in "biu":
            raise MaskError(f"{name} must be an integer label volume, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise MaskError(
                f"{name} holds labels {int(arr.min())}..{int(arr.max())}, outside 0..{num_classes - 1}"
            )
    return pred, truth


def _channel(labels: np.ndarray, cls: int) -> torch.Tensor:
    """Class `cls` as a (1, 1, *spatial) bool tensor: the only 'one-hot' MONAI gets from us."""
    return torch.from_numpy(np.ascontiguousarray(labels == cls))[None, None]


def _distance_metrics(p: torch.Tensor, t: torch.Tensor, spacing: list[float], tolerance_mm: float) -> dict:
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return {"hd95_mm": math.nan, "assd_mm": math.nan, "nsd": math.nan}
    if p_any != t_any:
        return {"hd95_mm": math.inf, "assd_mm": math.inf, "nsd": 0.0}
    with warnings.catch_warnings():
        # MONAI 1.6 calls its own deprecated `always_return_as_numpy` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=spacing)
        assd = compute_average_surface_distance(p, t, include_background=True, symmetric=True, spacing=spacing)
        nsd = compute_surface_dice(p, t, class_thresholds=[tolerance_mm], include_background=True, spacing=spacing)
    return {"hd95_mm": float(hd95), "assd_mm": float(assd), "nsd": float(nsd)}


def _confusion(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """MONAI confusion matrix [tp, fp, tn, fn] per batch item: one pass gives every overlap metric.

    (Dice is MONAI's "f1 score" and IoU its "threat score" on this matrix; `compute_dice`'s
    masked_select path is ~4x slower on a 512x512x150 volume.)
    """
    return get_confusion_matrix(p.view(torch.uint8), t.view(torch.uint8), include_background=True)[:, 0]


def _overlap(cm: torch.Tensor, name: str, empty_both: float = math.nan) -> np.ndarray:
    """`name` from the confusion matrices, with `empty_both` where neither mask has the class."""
    value = compute_confusion_matrix_metric(name, cm.double()).numpy()
    empty = (cm[:, 0] + cm[:, 1] + cm[:, 3] == 0).numpy()
    return np.where(empty, empty_both, value)


def _class_metrics(
    p: torch.Tensor, t: torch.Tensor, spacing: list[float], tolerance_mm: float, distances: bool
) -> dict:
    cm = _confusion(p, t)
    out = {
        name: float(_overlap(cm, key)[0])
        for name, key in (("dice", "f1 score"), ("iou", "threat score"), ("precision", "precision"),
                          ("recall", "sensitivity"))
    }
    out["accuracy"] = float(_overlap(cm, "accuracy", empty_both=1.0)[0])  # every voxel right
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out["truth_ml"] = int(t.sum()) * voxel_ml
    out["pred_ml"] = int(p.sum()) * voxel_ml
    if distances:
        out.update(_distance_metrics(p, t, spacing, tolerance_mm))
    return out


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    num_classes: int = 2,
    tolerance_mm: float = 2.0,
    distances: bool = True,
) -> dict[str, float]:
    """Volume metrics of `pred` against `truth` (see the module docstring for empty masks).

    Returns `dice`, `iou`, `precision`, `recall`, `accuracy`, `truth_ml`, `pred_ml` and, with
    `distances=True`, `hd95_mm` (MONAI's symmetric 95th-percentile Hausdorff distance), `assd_mm`
    (average symmetric surface distance) and `nsd` (normalised surface Dice at `tolerance_mm`).
    With more than one foreground class each metric also appears per class as `<metric>_<class>`
    and the plain key is the mean over classes, except `accuracy`, which is the fraction of
    voxels whose label is right and `truth_ml`/`pred_ml`, which are the foreground totals.
    """
    pred, truth = _check_pair(pred, truth, num_classes)
    spacing = [float(s) for s in spacing]
    if len(spacing) != pred.ndim:
        raise MaskError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D volume")
    per_class = {
        cls: _class_metrics(_channel(pred, cls), _channel(truth, cls), spacing, tolerance_mm, distances)
        for cls in range(1, num_classes)
    }
    if num_classes == 2:
        return per_class[1]
    result: dict[str, float] = {}
    for cls, values in per_class.items():
        result.update({f"{name}_{cls}": value for name, value in values.items()})
    present = [values["truth_ml"] > 0 or values["pred_ml"] > 0 for values in per_class.values()]
    for name in per_class[1]:
        column = [values[name] for values in per_class.values()]
        if name in VOLUME_METRICS:
            result[name] = float(np.sum(column))
        else:  # classes absent from both masks are left out; a missed or invented class is not
            scored = [v for v, keep in zip(column, present) if keep]
            result[name] = float(np.mean(scored)) if scored else math.nan
    result["accuracy"] = float(np.mean(pred == truth)) if pred.size else 1.0
    return result


def slice_dice(
    pred: np.ndarray,
    truth: np.ndarray,
    empty_threshold: int = DEFAULT_EMPTY_THRESHOLD,
    num_classes: int = 2,
) -> np.ndarray:
    """Dice of every axial slice (axis 0), shape (z,), with the empty-slice rule.

    The ends of the lungs hold slices with no truth; plain Dice would score a stray pixel there
    as 0 and an empty prediction as undefined. Rule, per class: truth empty and no predicted
    pixels, or fewer than `empty_threshold` -> 1; truth empty and more -> 0; otherwise the
    ordinary Dice. With several foreground classes the slice value is the class mean.
    """
    pred, truth = _check_pair(pred, truth, num_classes)
    if pred.ndim != 3:
        raise MaskError(f"slice_dice needs (z, y, x) volumes, got shape {pred.shape}")
    if empty_threshold < 0:
        raise MaskError(f"empty_threshold must be >= 0 pixels, got {empty_threshold}")
    scores = []
    for cls in range(1, num_classes):
        p_cls, t_cls = pred == cls, truth == cls
        # slices as a batch (z, 1, y, x): one MONAI call scores every slice
        dice = _overlap(_confusion(torch.from_numpy(p_cls)[:, None], torch.from_numpy(t_cls)[:, None]), "f1 score",
                        empty_both=1.0)
        truth_empty = ~t_cls.any(axis=(1, 2))
        pred_pixels = p_cls.sum(axis=(1, 2))
        judged_empty = (pred_pixels == 0) | (pred_pixels < empty_threshold)
        dice = np.where(truth_empty, judged_empty.astype(np.float64), dice)
        scores.append(dice)
    return np.mean(scores, axis=0)
