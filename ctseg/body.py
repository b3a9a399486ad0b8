"""The patient's body in a CT volume: what lung candidates must lie inside.

A lung network sees dark pixels; outside air, the air between the patient's back and the table
and the lungs look alike to it. The body is cheap to find from HU alone, so post-processing can
drop everything the network put outside it before it keeps the largest components (a blob under
the back is otherwise kept as a "lung" and a real lung base dropped). numpy and scipy only: the
exported MONAI bundle vendors this module and applies the same step.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Soft tissue and fat are above it; air, lung and the table's foam core are below it.
BODY_THRESHOLD_HU = -500.0
#: Below any air or tissue: a scanner's padding outside its reconstruction circle (-2000, -3024 HU).
PADDING_HU = -1500.0

_FACES = ndimage.generate_binary_structure(3, 1)
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def body_mask(hu_zyx: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """(z, y, x) bool: the largest 3D component above `threshold`, its holes filled slice by slice.

    The table is a separate component: air lies between it and the patient's back. Holes are
    filled per axial slice (lungs, trachea and bowel gas are enclosed in-plane, not in 3D: the
    trachea leaves the volume at its top). Where the field of view cuts the body, each image edge
    is closed between the body's outermost pixels on it, so a lung cut by the edge stays inside;
    where a scanner's reconstruction circle (padding below PADDING_HU) cuts it, `_cut_by_field`
    keeps the lung it opened.
    """
    hu = np.asarray(hu_zyx)
    if hu.ndim != 3:
        raise ValueError(f"body_mask expects a (z, y, x) volume, got shape {hu.shape}")
    out = np.zeros(hu.shape, dtype=bool)
    above = hu > threshold
    box = _box(above)
    if box is None:
        return out
    features, count = ndimage.label(above[box], structure=_FACES)
    largest = int(np.argmax(ndimage.histogram(features, 1, count, count))) + 1  # sizes of 1..count
    inner = ndimage.find_objects(features, max_label=largest)[largest - 1]  # the body's own box
    body = features[inner] == largest
    box = tuple(slice(outer.start + part.start, outer.start + part.stop) for outer, part in zip(box, inner))
    _close_cut_edges(body, box, hu.shape)
    filled = _fill_in_plane(body)
    padding = hu[box] < PADDING_HU
    if padding.any():
        filled = _fill_in_plane(filled | _cut_by_field(filled, padding))
    out[box] = filled
    return out


def _box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of `mask`, or None when it is empty."""
    box = []
    for axis in range(mask.ndim):
        found = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if found.size == 0:
            return None
        box.append(slice(int(found[0]), int(found[-1]) + 1))
    return tuple(box)


def _close_cut_edges(body: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> None:
    """On each in-plane image edge the box reaches, mark as body everything between the body's
    first and last pixel on that edge (in place): the field of view cut the body there."""
    for axis in (1, 2):
        for end, touches in ((0, box[axis].start == 0), (-1, box[axis].stop == shape[axis])):
            if not touches:
                continue
            edge = np.take(body, end, axis=axis)  # (z, n): one line per slice
            after_first = np.logical_or.accumulate(edge, axis=1)
            before_last = np.logical_or.accumulate(edge[:, ::-1], axis=1)[:, ::-1]
            index = [slice(None)] * 3
            index[axis] = end
            body[tuple(index)] = after_first & before_last


def _cut_by_field(body: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """The in-plane regions outside `body` that the reconstruction field's edge opened: each one
    touching the padding and lying mostly between body pixels along its row or its column (a
    lung under a cut chest wall), unlike outside air, which has body on one side only."""
    def between(axis: int) -> np.ndarray:
        before = np.logical_or.accumulate(body, axis=axis)
        after = np.flip(np.logical_or.accumulate(np.flip(body, axis=axis), axis=axis), axis=axis)
        return before & after

    features, count = ndimage.label(~body & ~padding, structure=_IN_PLANE)
    touching = np.zeros(count + 1, dtype=bool)
    touching[np.unique(features[ndimage.binary_dilation(padding, structure=_IN_PLANE)])] = True
    spanned = ndimage.mean(between(1) | between(2), features, index=np.arange(count + 1))
    keep = touching & (np.asarray(spanned) > 0.5)
    keep[0] = False  # body and padding
    return keep[features]


def _fill_in_plane(body: np.ndarray) -> np.ndarray:
    """Fill each axial slice's holes: background not connected in-plane to the slice's border.

    One labelling of the whole stack with in-plane connectivity instead of a loop over slices.
    """
    features, _ = ndimage.label(~body, structure=_IN_PLANE)
    border = np.concatenate([features[:, 0, :], features[:, -1, :],
                             features[:, :, 0], features[:, :, -1]], axis=1)
    outside = np.zeros(int(features.max()) + 1, dtype=bool)
    outside[np.unique(border)] = True
    outside[0] = False  # the body itself
    return ~outside[features]
