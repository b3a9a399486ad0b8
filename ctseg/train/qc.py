"""QC images of a training run: the best, median and worst validation slices, truth and prediction.

A mean Dice hides where a model fails; three slices ranked by per-slice Dice show it at a glance.
Only slices where truth or prediction has foreground are ranked (empty-empty slices are trivially
perfect and say nothing). The picking rule and the drawing are `ctseg.evaluate.figures`', shared
with `ctseg evaluate`'s gallery (lung window, truth green, prediction red).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctseg.evaluate import figures
from ctseg.evaluate.metrics import slice_dice


@dataclass
class QCCase:
    name: str
    hu: np.ndarray     # (z, y, x) HU at original resolution
    truth: np.ndarray  # (z, y, x) labels
    pred: np.ndarray   # (z, y, x) labels
    pixel_spacing_yx: tuple[float, float]  # mm, for the aspect ratio


def rank_slices(cases: list[QCCase], num_classes: int = 2) -> dict[str, tuple[int, int, float]]:
    """{"best"|"median"|"worst": (case index, slice, Dice)} over slices with any foreground."""
    dice, where, active = [], [], []
    for c, case in enumerate(cases):
        scores = slice_dice(case.pred, case.truth, empty_threshold=0, num_classes=num_classes)
        dice.append(scores)
        where += [(c, z) for z in range(len(scores))]
        active.append((case.truth.reshape(len(scores), -1).max(axis=1) > 0)
                      | (case.pred.reshape(len(scores), -1).max(axis=1) > 0))
    if not cases:
        return {}
    flat = np.concatenate(dice)
    picks = figures.best_median_worst(flat, np.flatnonzero(np.concatenate(active)))
    return {kind: (*where[i], float(flat[i])) for kind, i in picks}


def write_qc_images(cases: list[QCCase], out_dir: Path, num_classes: int = 2) -> list[Path]:
    """Write `qc/{best,median,worst}.png`; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    for kind, (c, z, dice) in rank_slices(cases, num_classes).items():
        case = cases[c]
        panel = (f"{kind}: {case.name} slice {z}  Dice {dice:.3f}", np.asarray(case.hu[z], dtype=np.float32),
                 np.asarray(case.truth[z]) > 0, np.asarray(case.pred[z]) > 0)
        written.append(figures.slice_gallery(case.name, [panel], case.pixel_spacing_yx, out_dir / f"{kind}.png"))
    return written
