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
    full = np.asarray(labels_zyx) > 0
    out = np.zeros(full.shape, dtype=np.uint8)
    if not full.any():
        return out
    # work inside the mask's bounding box (a fifth of a thoracic CT); `origin` maps back
    box = _bounding_box(full)
    origin = np.array([b.start for b in box])
    mask = full[box]
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:]
    order = np.argsort(sizes, kind="stable")[::-1] + 1
    labelled = out[box]
    if count >= 2 and sizes[order[1] - 1] >= MIN_SECOND * sizes[order[0] - 1]:
        first, second = (int(c) for c in order[:2])
        lungs = {c: components == c for c in (first, second)}
        centres = {c: float(ras_x(affine, _centroid(m) + origin)[0]) for c, m in lungs.items()}
        right = max(centres, key=centres.get)  # RAS: + x is the patient's right
        for c, m in lungs.items():
            labelled[m] = RIGHT if c == right else LEFT
        plane = float(np.mean(list(centres.values())))
        rest = mask & (labelled == 0)
    else:
        plane, where = _body_centre(full, affine, hu_zyx)
        log.warning("the lungs touch (%s): split along the mid-sagittal plane through the %s, "
                    "an approximate cut near where they meet",
                    "one connected component" if count == 1 else
                    f"second component {sizes[order[1] - 1]} voxels", where)
        rest = mask
    kji = np.argwhere(rest)
    if len(kji):
        labelled[tuple(kji.T)] = np.where(ras_x(affine, kji + origin) > plane, RIGHT, LEFT).astype(np.uint8)
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _centroid(mask: np.ndarray) -> np.ndarray:
    """Mean (k, j, i) index of a boolean volume's True voxels, from its three marginals (fast)."""
    total = np.count_nonzero(mask)
    return np.array([np.arange(n) @ mask.sum(axis=tuple(a for a in range(3) if a != axis))
                     for axis, n in enumerate(mask.shape)], dtype=np.float64) / total


def _body_centre(mask: np.ndarray, affine: np.ndarray, hu: np.ndarray | None) -> tuple[float, str]:
    """RAS x of the body's centre of mass (HU > BODY_HU), else of the mask, and which was used."""
    if hu is not None and np.shape(hu) == mask.shape:
        body = np.asarray(hu) > BODY_HU
        if body.any():
            return float(ras_x(affine, _centroid(body))[0]), "body's centre"
    return float(ras_x(affine, _centroid(mask))[0]), "lung mask's centre"
