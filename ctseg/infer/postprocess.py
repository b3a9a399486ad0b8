"""Post-processing of predicted label volumes, built from MONAI transforms and the model's config.

Two steps, both MONAI's own, on by default and recorded with the model (`infer.postprocess` in
the saved config, copied into exported bundles):

    infer:
      postprocess:
        enabled: true
        keep_largest: 2       # largest connected components kept per label (lungs: two);
                              # a mapping {label: n} sets it per label; 0 or null: off
        fill_holes: true      # fill background fully enclosed by a label (vessels in the lung)
        connectivity: null    # null: full 3D connectivity (26-neighbourhood); 1: faces only

The steps are described as (MONAI class name, keyword arguments) pairs. `ctseg predict` builds
the MONAI transforms from them; `ctseg export-bundle` writes the same pairs into the bundle's
`postprocessing`, so both apply identical operations. Both run on the (1, x, y, z) layout MONAI's
loaders give, so even ties between equally large components are broken the same way.

They run inside the bounding box of the foreground plus a one-voxel margin (`InForegroundBox`):
on a thoracic CT that box is a fifth of the volume, and MONAI's `FillHoles` (an iterated
dilation) took 8 s on a whole 154x512x512 case. The result is identical to running them on the
whole volume: every component of every label lies inside the box, and the margin, outside all
labels, connects the box's border to the volume's border exactly as the voxels cut away did.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection

from ctseg.config import get, schema_defaults
from ctseg.errors import ConfigError

DEFAULT_POSTPROCESS: dict[str, Any] = schema_defaults()["infer"]["postprocess"]

Step = tuple[str, dict[str, Any]]


def postprocess_settings(config: dict) -> dict[str, Any]:
    """`infer.postprocess` of a model's config over the defaults (absent = on, lungs defaults)."""
    spec = get(config, "infer.postprocess", None)
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


class InForegroundBox(mt.Transform):
    """Apply label transforms to the foreground's bounding box (+1 voxel) of a (1, ...) label map.

    For transforms whose result depends only on the labelled voxels and their connectivity to
    the volume border (connected components, hole filling) this equals applying them to the
    whole map, at the cost of the box.
    """

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = mt.Compose(list(transforms))

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim < 2 or labels.shape[0] != 1:
            raise ValueError(f"InForegroundBox expects a (1, ...) label map, got {tuple(labels.shape)}")
        found = torch.nonzero(labels[0])
        if found.numel() == 0:
            return labels
        lo = (found.min(dim=0).values - 1).clamp(min=0)
        hi = found.max(dim=0).values + 2
        box = (slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi)))
        out = labels.clone()
        out[box] = torch.as_tensor(self.transforms(labels[box].clone()), dtype=labels.dtype)
        return out


class InForegroundBoxd(mt.MapTransform):
    """Dictionary version of `InForegroundBox` for MONAI bundle post-processing."""

    def __init__(self, keys: KeysCollection, transforms: Sequence[Callable],
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.box = InForegroundBox(transforms)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.box(d[key])
        return d


def build_postprocess(steps: list[Step]) -> InForegroundBox:
    """The transforms for channel-first label volumes (1, x, y, z)."""
    return InForegroundBox([getattr(mt, name)(**kwargs) for name, kwargs in steps])


def bundle_postprocess(steps: list[Step], key: str = "pred") -> list[dict[str, Any]]:
    """The same steps as MONAI bundle config entries (one dictionary transform on `key`)."""
    if not steps:
        return []
    return [{"_target_": "ctseg.infer.postprocess.InForegroundBoxd", "keys": key,
             "transforms": [{"_target_": name, **kwargs} for name, kwargs in steps]}]


def postprocess_labels(labels_zyx: np.ndarray, steps: list[Step]) -> np.ndarray:
    """Apply `steps` to a (z, y, x) uint8 label volume; returns a new (z, y, x) uint8 volume."""
    if not steps:
        return labels_zyx
    volume = torch.from_numpy(np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)))[None]
    out = build_postprocess(steps)(volume)
    out = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return np.ascontiguousarray(out[0].transpose(2, 1, 0)).astype(np.uint8, copy=False)
