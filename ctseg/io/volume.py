"""The in-memory CT volume every stage passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class CTVolume:
    """A CT series in Hounsfield units with its true geometry.

    `array` is (z, y, x) float32 HU with z ascending along the slice normal; `affine` maps
    (i=x, j=y, k=z) voxel indices to RAS millimetres as nibabel expects, so
    `nibabel.Nifti1Image(array.transpose(2, 1, 0), affine)` lands on the patient correctly.
    `metadata` holds only non-identifying fields (series UID, modality, manufacturer, kernel,
    `order_key`); patient names, IDs and dates never enter it.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    files: list[Path] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)
