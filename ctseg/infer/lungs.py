"""Right and left lung as separate labels of a binary lung mask (`--split-lungs`, `infer.split_lungs`).

A lung network gives one foreground label; radiotherapy contours and lung-volume reports want
each lung. The two largest 3D connected components are the lungs, and the patient's left-right
axis comes from the CT's affine (RAS: +x points to the patient's *right*, whatever the voxel
order on disk), so a flipped or oblique volume is labelled by anatomy, not by array index.
Labels follow lungmask's convention: 1 right lung, 2 left lung.

When the lungs touch (one component holds both, or the second is a crumb smaller than
`MIN_SECOND` of the largest) the mask is cut along the mid-sagittal plane through the body's
centre (voxels above -500 HU; the mask's own centre without HU), with a warning: near the
anterior junction that cut is approximate.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

RIGHT, LEFT = 1, 2
#: The second-largest component counts as a lung only from this share of the largest's voxels.
MIN_SECOND = 0.1
#: HU above which a voxel belongs to the body (soft tissue, bone; not air or lung).
BODY_HU = -500.0


def ras_x(affine: np.ndarray, kji: np.ndarray) -> np.ndarray:
    """RAS x (mm, + = patient right) of voxels given as (N, 3) (z, y, x) = (k, j, i) indices."""
    a = np.asarray(affine, dtype=np.float64)
    kji = np.asarray(kji, dtype=np.float64).reshape(-1, 3)
    return kji[:, 2] * a[0, 0] + kji[:, 1] * a[0, 1] + kji[:, 0] * a[0, 2] + a[0, 3]


def split_lungs(labels_zyx: np.ndarray, affine: np.ndarray, hu_zyx: np.ndarray | None = None) -> np.ndarray:
    """(z, y, x) uint8: 1 right lung, 2 left lung, 0 elsewhere, from a mask whose non-zero voxels
    are lung. Components beyond the two lungs go to the side of the plane between them."""
    mask = np.asarray(labels_zyx) > 0
    out = np.zeros(mask.shape, dtype=np.uint8)
    if not mask.any():
        return out
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(sizes, kind="stable")[::-1] + 1
    if count >= 2 and sizes[order[1] - 1] >= MIN_SECOND * sizes[order[0] - 1]:
        first, second = (int(c) for c in order[:2])
        centres = ras_x(affine, np.array(ndimage.center_of_mass(mask, components, [first, second])))
        right = first if centres[0] > centres[1] else second
        out[components == right] = RIGHT
        out[components == (second if right == first else first)] = LEFT
        plane = float(centres.mean())
        rest = mask & (out == 0)
    else:
        plane, where = _body_centre(mask, affine, hu_zyx)
        log.warning("the lungs touch (%s): split along the mid-sagittal plane through the %s, "
                    "an approximate cut near where they meet",
                    "one connected component" if count == 1 else
                    f"second component {sizes[order[1] - 1]} voxels", where)
        rest = mask
    kji = np.argwhere(rest)
    if len(kji):
        out[tuple(kji.T)] = np.where(ras_x(affine, kji) > plane, RIGHT, LEFT).astype(np.uint8)
    return out


def _body_centre(mask: np.ndarray, affine: np.ndarray, hu: np.ndarray | None) -> tuple[float, str]:
    """RAS x of the body's centre of mass (HU > BODY_HU), else of the mask, and which was used."""
    if hu is not None and np.shape(hu) == mask.shape:
        body = np.asarray(hu) > BODY_HU
        if body.any():
            return float(ras_x(affine, np.array(ndimage.center_of_mass(body)))[0]), "body's centre"
    return float(ras_x(affine, np.array(ndimage.center_of_mass(mask)))[0]), "lung mask's centre"
