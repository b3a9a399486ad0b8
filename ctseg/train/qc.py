"""QC images: the best, median and worst validation slices with truth and prediction overlaid.

A mean Dice hides where a model fails; three slices ranked by per-slice Dice show it at a glance.
Only slices where truth or prediction has foreground are ranked (empty-empty slices are trivially
perfect and say nothing). Rendered with matplotlib's Agg canvas directly (no pyplot global state).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctseg.evaluate.metrics import slice_dice
from ctseg.utils import atomic_path


@dataclass
class QCCase:
    name: str
    hu: np.ndarray     # (z, y, x) HU at original resolution
    truth: np.ndarray  # (z, y, x) labels
    pred: np.ndarray   # (z, y, x) labels


def rank_slices(cases: list[QCCase], num_classes: int = 2) -> dict[str, tuple[int, int, float]]:
    """{"best"|"median"|"worst": (case index, slice, Dice)} over slices with any foreground."""
    scored: list[tuple[float, int, int]] = []
    for c, case in enumerate(cases):
        dice = slice_dice(case.pred, case.truth, empty_threshold=0, num_classes=num_classes)
        active = (case.truth.reshape(len(dice), -1).max(axis=1) > 0) | \
                 (case.pred.reshape(len(dice), -1).max(axis=1) > 0)
        scored += [(float(dice[z]), c, int(z)) for z in np.flatnonzero(active)]
    if not scored:
        return {}
    scored.sort()
    picks = {"worst": scored[0], "median": scored[len(scored) // 2], "best": scored[-1]}
    return {k: (c, z, d) for k, (d, c, z) in picks.items()}


def write_qc_images(cases: list[QCCase], window: tuple[float, float], out_dir: Path,
                    num_classes: int = 2) -> list[Path]:
    """Write `qc/{best,median,worst}.png`; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    for kind, (c, z, dice) in rank_slices(cases, num_classes).items():
        case = cases[c]
        path = out_dir / f"{kind}.png"
        _render(case.hu[z], case.truth[z], case.pred[z], window,
                f"{kind}: {case.name} slice {z}  Dice {dice:.3f}", path, num_classes)
        written.append(path)
    return written


def _render(hu: np.ndarray, truth: np.ndarray, pred: np.ndarray, window: tuple[float, float],
            title: str, path: Path, num_classes: int) -> None:
    fig = Figure(figsize=(5, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 0.92))
    ax.imshow(np.asarray(hu, dtype=np.float32), cmap="gray", vmin=window[0], vmax=window[1],
              interpolation="nearest")
    ax.imshow(np.ma.masked_equal(np.asarray(pred), 0), cmap="autumn", alpha=0.3,
              vmin=1, vmax=max(num_classes - 1, 1), interpolation="nearest")
    for cls in range(1, num_classes):
        for mask, colour in ((truth, "lime"), (pred, "red")):
            m = np.asarray(mask) == cls
            if m.any() and not m.all():
                ax.contour(m.astype(np.uint8), levels=[0.5], colors=colour, linewidths=0.8)
    ax.set_axis_off()
    fig.suptitle(f"{title}\ntruth: green contour   prediction: red", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
