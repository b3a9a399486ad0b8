"""PNG figures for evaluation and training reports.

Uses matplotlib's object API (`Figure`, Agg canvas) rather than pyplot: no global figure state,
no display needed, safe inside servers and tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ctseg.utils import atomic_path

#: Lung window (level -600 HU, width 1500 HU) for CT backgrounds.
LUNG_WINDOW = (-1350.0, 150.0)
TRUTH_COLOUR = "#2ca02c"
PRED_COLOUR = "#d62728"


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def slice_dice_plot(
    case: str, positions_mm: np.ndarray, dice: np.ndarray, truth_present: np.ndarray,
    empty_threshold: int, path: Path, *, counted: np.ndarray,
) -> Path:
    """Per-slice Dice along the scan axis; slices without truth are drawn hollow, and those where
    the model predicted without truth (`counted`, scored 0) as red crosses."""
    fig = Figure(figsize=(7, 3))
    ax = fig.add_subplot()
    ax.plot(positions_mm, dice, color="0.6", linewidth=0.8)
    ax.scatter(positions_mm[truth_present], dice[truth_present], s=10, color="C0", label="truth on slice")
    false_positive = ~truth_present & counted
    empty = ~truth_present & ~false_positive
    ax.scatter(positions_mm[empty], dice[empty], s=10, facecolors="none", edgecolors="C1",
               label=f"empty in both (prediction < {empty_threshold} px counts as empty)")
    if false_positive.any():
        ax.scatter(positions_mm[false_positive], dice[false_positive], s=18, marker="x", color=PRED_COLOUR,
                   label="prediction without truth")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("slice position along the scan axis (mm)")
    ax.set_ylabel("Dice")
    ax.set_title(f"{case}: per-slice Dice")
    ax.legend(loc="lower center", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def dice_histogram(groups: Mapping[str, np.ndarray], path: Path, title: str = "Per-slice Dice") -> Path:
    """Overlaid histograms of per-slice Dice, one per group (e.g. train vs test cases)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 41)
    for name, values in groups.items():
        values = np.asarray(values, dtype=float)
        ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={values.size}, mean {np.mean(values):.3f})")
    ax.set_xlabel("Dice")
    ax.set_ylabel("slices")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def slice_gallery(
    case: str,
    panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    pixel_spacing_yx: tuple[float, float],
    path: Path,
) -> Path:
    """CT slices with truth (green) and prediction (red) contours: one panel per (title, ct, truth, pred).

    Each panel is cropped to the segmented region plus a margin, so small misses stay visible.
    """
    fig = Figure(figsize=(4 * len(panels), 4.4))
    aspect = pixel_spacing_yx[0] / pixel_spacing_yx[1]
    for i, (title, ct, truth, pred) in enumerate(panels, start=1):
        window = _crop(truth | pred)
        ct, truth, pred = ct[window], truth[window], pred[window]
        ax = fig.add_subplot(1, len(panels), i)
        ax.imshow(ct, cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1], aspect=aspect,
                  interpolation="nearest")
        for mask, colour in ((truth, TRUTH_COLOUR), (pred, PRED_COLOUR)):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=0.9)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{case}: truth (green) and prediction (red)", fontsize=10)
    return _save(fig, path)


def _crop(mask: np.ndarray, margin: float = 0.25, min_margin: int = 16) -> tuple[slice, slice]:
    """Bounding box of `mask` grown by `margin` of its size (at least `min_margin` px); all if empty."""
    if not mask.any():
        return slice(None), slice(None)
    window = []
    for axis in (1, 0):
        hits = np.flatnonzero(mask.any(axis=axis))
        pad = max(min_margin, int(margin * (hits[-1] - hits[0] + 1)))
        window.append(slice(max(hits[0] - pad, 0), min(hits[-1] + pad + 1, mask.shape[1 - axis])))
    return tuple(window)


def training_curves(history: Mapping[str, np.ndarray], path: Path, title: str = "Training") -> Path:
    """Loss, validation metrics and learning rate against epoch from a run's history.csv columns."""
    epoch = history["epoch"]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_loss, ax_val, ax_lr = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for key in ("train_loss", "val_loss"):
        if key in history:
            ax_loss.plot(epoch, history[key], marker=".", label=key)
    ax_loss.set_title("loss")
    for key in ("val_dice", "val_slice_dice", "val_iou", "val_precision", "val_recall"):
        if key in history:
            ax_val.plot(epoch, history[key], marker=".", label=key)
    ax_val.set_ylim(0.0, 1.02)
    ax_val.set_title("validation")
    if "lr" in history:
        ax_lr.plot(epoch, history["lr"], marker=".")
        ax_lr.set_yscale("log")
    ax_lr.set_title("learning rate")
    for ax in (ax_loss, ax_val, ax_lr):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *, title: str,
    xlabel: str, ylabel: str, categorical: bool = False,
) -> Path:
    """One line per named (x, y) series; `categorical` plots x as labels (e.g. version names)."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    for name, (x, y) in series.items():
        xs = np.arange(len(x)) if categorical else np.asarray(x, dtype=float)
        ax.plot(xs, np.asarray(y, dtype=float), marker="o", label=name)
        if categorical:
            ax.set_xticks(xs, [str(v) for v in x])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)
