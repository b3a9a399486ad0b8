"""Per-case statistics of a label map: volume (mL) and mean HU inside each label.

The numbers a lung report starts from (total and per-lung volume, mean density), measured on
the CT's own grid: a voxel counts `prod(spacing)` mm^3, the HU are the CT's as read by
`ctseg.io`. `ctseg predict` writes them to `<case>.statistics.json`, the folder's
`statistics.json` and columns of `predictions.csv`.
"""

from __future__ import annotations

import numpy as np


def label_statistics(labels_zyx: np.ndarray, hu_zyx: np.ndarray, spacing: tuple[float, float, float],
                     names: dict[int, str]) -> dict:
    """`{"foreground": {...}, "labels": {name: {...}}}`, each `{label, voxels, volume_ml, mean_hu}`.

    Every label of `names` is listed, also when absent (0 voxels, mean_hu None); "foreground" is
    every non-zero voxel. Labels found but not named are listed as "label N".
    """
    labels = np.asarray(labels_zyx)
    hu = np.asarray(hu_zyx)
    if labels.shape != hu.shape:
        raise ValueError(f"labels {labels.shape} and CT {hu.shape} differ in shape")
    flat = labels.ravel().astype(np.intp, copy=False)
    counts = np.bincount(flat)
    sums = np.bincount(flat, weights=hu.ravel().astype(np.float64, copy=False))
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    values = sorted(set(names) | {int(v) for v in np.flatnonzero(counts) if v != 0})

    def entry(count: int, total: float, label: int | None = None) -> dict:
        row = {"label": label} if label is not None else {}
        return {**row, "voxels": int(count), "volume_ml": round(count * voxel_ml, 3),
                "mean_hu": round(total / count, 2) if count else None}

    def at(array: np.ndarray, v: int) -> float:
        return array[v] if v < len(array) else 0

    return {
        "voxel_ml": voxel_ml,
        "foreground": entry(counts[1:].sum(), sums[1:].sum()),
        "labels": {names.get(v, f"label {v}"): entry(at(counts, v), at(sums, v), v) for v in values},
    }
