"""Post-processing of predicted label volumes, built from MONAI transforms and the model's config.

Two steps, both MONAI's own, on by default and recorded with the model (`infer.postprocess` in
the saved config, copied into exported bundles), after a first one of ours (`infer.body_mask`,
default true): labels outside the patient's body (`ctseg.body`, from the CT's HU) are dropped
before components are kept, so air under the back taken for lung cannot outrank a real lung:

    infer:
      postprocess:
        enabled: true
        keep_largest: 2       # largest connected components kept per label (lungs: two);
                              # a mapping {label: n} sets it per label; 0 or null: off
        fill_holes: true      # fill background fully enclosed by a label (vessels in the lung)
        connectivity: null    # null: full 3D connectivity (26-neighbourhood); 1: faces only

The steps are described as (MONAI class name, keyword arguments) pairs. `ctseg export-bundle`
writes them into the bundle's `postprocessing`, where MONAI's own transforms run them;
`ctseg predict` runs the same steps with scipy.ndimage (`postprocess_labels`), which computes the
identical result (tests/test_postprocess.py checks it against MONAI, ties between equally large
components included) in a fraction of the time: MONAI's `FillHoles` grows the border's reach by
iterated dilation, one pass per voxel of depth, where one connected-component labelling suffices.

Both run inside the bounding box of the foreground plus a one-voxel margin: on a thoracic CT that
box is a fifth of the volume. The result is identical to running them on the whole volume: every
component of every label lies inside the box, and the margin, outside all labels, connects the
box's border to the volume's border exactly as the voxels cut away did.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from ctseg.body import body_mask
from ctseg.config import config_view, get, schema_defaults
from ctseg.errors import ConfigError

DEFAULT_POSTPROCESS: dict[str, Any] = schema_defaults()["infer"]["postprocess"]

Step = tuple[str, dict[str, Any]]


def postprocess_settings(config: dict) -> dict[str, Any]:
    """`infer.postprocess` of a model's config over the defaults (absent = on, lungs defaults)."""
    spec = get(config, "infer.postprocess")
    if spec is None:
        return dict(DEFAULT_POSTPROCESS)
    if spec is False:
        return {**DEFAULT_POSTPROCESS, "enabled": False}
    if not isinstance(spec, dict):
        raise ConfigError(f"infer.postprocess must be a mapping or false, got {spec!r}")
    unknown = sorted(set(spec) - set(DEFAULT_POSTPROCESS))
    if unknown:
        raise ConfigError(f"infer.postprocess: unknown setting(s) {unknown}; "
                          f"known: {sorted(DEFAULT_POSTPROCESS)}")
    return {**DEFAULT_POSTPROCESS, **spec}


def body_mask_enabled(config: dict) -> bool:
    """`infer.body_mask`, a post-processing step: off with `infer.postprocess.enabled: false`."""
    return config_view(config).infer.body_mask and bool(postprocess_settings(config)["enabled"])


def case_body(config: dict, hu_zyx: np.ndarray) -> np.ndarray | None:
    """The body mask `postprocess_labels` restricts labels to, or None when `config` skips it."""
    return body_mask(hu_zyx) if body_mask_enabled(config) else None


def postprocess_steps(config: dict, num_classes: int) -> list[Step]:
    """The MONAI transforms (class name, kwargs) that `config` asks for, in order of application.

    Connected components are pruned first, so holes are filled only in what is kept.
    """
    settings = postprocess_settings(config)
    if not settings["enabled"]:
        return []
    labels = list(range(1, num_classes))
    connectivity = settings["connectivity"]
    if connectivity is not None:
        connectivity = int(connectivity)
        if not 1 <= connectivity <= 3:
            raise ConfigError(f"infer.postprocess.connectivity must be 1, 2, 3 or null, got {connectivity}")
    steps: list[Step] = []
    for count, applied in _components_per_label(settings["keep_largest"], labels):
        steps.append(("KeepLargestConnectedComponent",
                      {"applied_labels": applied, "is_onehot": False, "independent": True,
                       "connectivity": connectivity, "num_components": count}))
    if settings["fill_holes"]:
        steps.append(("FillHoles", {"applied_labels": labels, "connectivity": connectivity}))
    return steps


def _components_per_label(keep: Any, labels: list[int]) -> list[tuple[int, list[int]]]:
    """Group labels by how many components each keeps: [(n, [labels...]), ...], n > 0 only."""
    if keep is None or keep is False:
        return []
    if isinstance(keep, dict):
        per_label = {}
        for label, count in keep.items():
            if int(label) not in labels:
                raise ConfigError(f"infer.postprocess.keep_largest: label {label} is not one of {labels}")
            per_label[int(label)] = int(count)
    else:
        per_label = {label: int(keep) for label in labels}
    if any(count < 0 for count in per_label.values()):
        raise ConfigError(f"infer.postprocess.keep_largest must be >= 0, got {keep!r}")
    groups: dict[int, list[int]] = {}
    for label in labels:
        if per_label.get(label, 0) > 0:
            groups.setdefault(per_label[label], []).append(label)
    return sorted(groups.items())


def postprocess_labels(labels_zyx: np.ndarray, steps: list[Step],
                       body: np.ndarray | None = None) -> np.ndarray:
    """Apply `steps` to a (z, y, x) uint8 label volume; returns a new (z, y, x) uint8 volume.

    With `body` ((z, y, x) bool, `case_body`), labels outside it are zeroed first. Each step runs
    on the foreground's bounding box (+1 voxel) of what the previous one left, with scipy.ndimage;
    the result is exactly what MONAI's transforms give on the whole (1, x, y, z) map.
    """
    if not steps and body is None:
        return labels_zyx
    out = np.array(labels_zyx, dtype=np.uint8, order="C")
    if body is not None:
        if body.shape != out.shape:
            raise ValueError(f"body mask {body.shape} and labels {out.shape} differ in shape")
        out[~body] = 0
    for name, kwargs in steps:
        if name not in _STEPS:
            raise ConfigError(f"infer.postprocess: no implementation of step {name!r}")
        box = _foreground_box(out)
        if box is None:
            break
        region = out[box]  # a view: steps work in place
        _STEPS[name](region, **kwargs)
    return out


def _foreground_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The foreground's bounding box plus a one-voxel margin (clipped to the volume), or None."""
    box = []
    for axis in range(labels.ndim):
        other = tuple(a for a in range(labels.ndim) if a != axis)
        found = np.flatnonzero(labels.any(axis=other))
        if found.size == 0:
            return None
        box.append(slice(max(int(found[0]) - 1, 0), int(found[-1]) + 2))
    return tuple(box)


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, connectivity or ndim)


def _keep_largest(volume: np.ndarray, applied_labels: Sequence[int], num_components: int,
                  connectivity: int | None, is_onehot: bool = False, independent: bool = True) -> None:
    """MONAI `KeepLargestConnectedComponent` (label map, each label on its own), in place on a
    (z, y, x) volume.

    MONAI ranks components by size with `argsort`, numbered in raster order of the (x, y, z) map.
    When sizes decide alone (the n-th largest is larger than the next), numbering does not matter
    and the (z, y, x) array is labelled as it lies; a tie at the cut is broken on MONAI's numbering.
    """
    if is_onehot or not independent:
        raise ConfigError("infer.postprocess: only label maps with labels kept independently")
    structure = _structure(volume.ndim, connectivity)
    for label in applied_labels:
        foreground = volume == label
        features, count = ndimage.label(foreground, structure=structure)
        if count <= num_components:
            continue
        sizes = np.bincount(features.reshape(-1))
        sizes[0] = 0
        ranked = np.sort(sizes[1:])[::-1]
        if ranked[num_components - 1] == ranked[num_components]:  # a tie at the cut: MONAI's order
            features = np.ascontiguousarray(features.transpose(2, 1, 0))
            features, _ = ndimage.label(features > 0, structure=structure)
            features = features.transpose(2, 1, 0)
            sizes = np.bincount(features.reshape(-1))
            sizes[0] = 0
            kept = np.argsort(sizes)[::-1][:num_components]  # exactly MONAI's ranking
        else:
            kept = np.argpartition(sizes, -num_components)[-num_components:]
        removed = np.ones(sizes.shape[0], dtype=bool)
        removed[kept] = False
        removed[0] = False
        volume[removed[features]] = 0


def _fill_holes(volume: np.ndarray, applied_labels: Sequence[int], connectivity: int | None) -> None:
    """MONAI `FillHoles` on a label map, in place (any axis order): whatever a label encloses (not connected to the
    volume border through non-label voxels) becomes that label. MONAI grows the border's reach by
    iterated dilation; the connected components of the non-label voxels give the same set at once."""
    structure = _structure(volume.ndim, connectivity)
    for label in set(applied_labels) - {0}:  # a set, as MONAI iterates it
        passable = volume != label
        features, _ = ndimage.label(passable, structure=structure)
        faces = [np.take(features, index, axis=axis) for axis in range(volume.ndim) for index in (0, -1)]
        open_ = np.zeros(int(features.max()) + 1, dtype=bool)
        open_[np.unique(np.concatenate([f.reshape(-1) for f in faces]))] = True
        open_[0] = True  # the label's own voxels
        volume[~open_[features]] = label


_STEPS: dict[str, Callable[..., None]] = {"KeepLargestConnectedComponent": _keep_largest,
                                          "FillHoles": _fill_holes}
