"""The MONAI pieces `bundles/lung_ct_segmentation/configs/inference.yaml` names by `_target_`.

The bundle runs MONAI's `SupervisedEvaluator`; these components let it read CT the way ctseg
does and write exactly what `ctseg predict` writes:

- `case_datalist(dataset_dir)`: the cases of a folder (DICOM series folder, case folder in any
  layout, NIfTI files) as MONAI data dicts `{"image": path, "case": name}`;
- `LoadCTSeriesd`: a dictionary transform that loads a case through `ctseg.io` into a MetaTensor
  laid out as MONAI's `LoadImaged` + `EnsureChannelFirstd` would lay out the `ctseg convert`
  NIfTI: (1, x, y, z) HU with the RAS affine in its metadata;
- `CTSliceInferer`: a MONAI `Inferer` running the 2D network slice by slice through
  `ctseg.infer.predictor.predict_volume` (MONAI's `SlidingWindowInferer` with a 2D ROI, the
  windowing/resizing/2.5D stacking of the model's config), returning class probabilities on
  the CT's own grid;
- `SaveCTMaskd`: writes `<output_dir>/<case>.nii.gz` through `ctseg.io.save_nifti`.

`bundle_root()` lets the config find its own folder, so the bundle runs from any directory.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from ctseg.errors import CTSegError
from ctseg.infer.predict import find_inputs, load_volume, output_path
from ctseg.infer.predictor import predict_volume
from ctseg.io import save_nifti

log = logging.getLogger(__name__)


def bundle_root(default: str = ".") -> str:
    """The folder of the bundle whose config is being run (the parent of its `configs/`).

    MONAI's `ConfigWorkflow` knows its config folder (it puts the bundle root on `sys.path`
    before running) but does not expose it to the config; this finds the workflow on the call
    stack and derives the root the same way. `--bundle_root` overrides it as usual.
    """
    from monai.bundle import ConfigWorkflow

    frame = sys._getframe(1)
    while frame is not None:
        workflow = frame.f_locals.get("self")
        if isinstance(workflow, ConfigWorkflow):
            root = Path(workflow.config_root_path)
            return str((root.parent if root.name == "configs" else root).resolve())
        frame = frame.f_back
    return default


def case_datalist(dataset_dir: str | Path) -> list[dict[str, str]]:
    """Every case of `dataset_dir` (or the one NIfTI file it names) as `{"image", "case"}` dicts."""
    return [{"image": str(case.image), "case": case.name} for case in find_inputs(dataset_dir)]


class LoadCTSeriesd(MapTransform):
    """Load a DICOM series folder or NIfTI file through `ctseg.io` as a channel-first MetaTensor.

    The array is (1, x, y, z) float32 HU and `meta["affine"]` the RAS affine of those voxel axes,
    i.e. what `LoadImaged` + `EnsureChannelFirstd` give for the NIfTI `ctseg convert` writes.
    Only geometry enters the metadata; no DICOM header field that could identify a patient.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = Path(d[key])
            volume = load_volume(source)
            affine = torch.as_tensor(volume.affine, dtype=torch.float64)
            meta = {"original_affine": affine.clone(), "space": "RAS",
                    "spatial_shape": np.asarray(volume.shape[::-1]), "filename_or_obj": str(source),
                    "original_channel_dim": "no_channel"}
            array = torch.from_numpy(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))[None]
            d[key] = MetaTensor(array, affine=affine, meta=meta)
        return d


class CTSliceInferer(Inferer):
    """Segment (B, 1, x, y, z) HU volumes with a 2D network, slice by slice, as `ctseg predict` does.

    `config` is the model's ctseg config (the bundle's `ctseg_config`): it fixes the training
    size (the sliding window's 2D ROI), HU window, 2.5D context, slices per batch, flip TTA and
    the number of classes. Returns a MetaTensor (B, C, x, y, z) of probabilities on the input's
    grid: for a binary model the foreground probability only (C = 1, threshold it with
    `AsDiscreted(threshold=infer.threshold)`), otherwise one channel per class (`argmax`).
    """

    def __init__(self, config: dict) -> None:
        self.config = config

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise CTSegError(f"CTSliceInferer expects (batch, 1, x, y, z) HU volumes, got {tuple(inputs.shape)}")
        if not isinstance(network, torch.nn.Module):
            raise CTSegError("CTSliceInferer needs the network as a torch.nn.Module")
        device = next(network.parameters()).device
        outputs = []
        for volume in inputs:
            hu_zyx = torch.as_tensor(volume[0], dtype=torch.float32).detach().cpu().permute(2, 1, 0)
            _, probs = predict_volume(network, hu_zyx.contiguous().numpy(), self.config, device)
            if probs.shape[0] == 2:  # binary: keep the foreground channel
                probs = probs[1:]
            outputs.append(torch.from_numpy(np.ascontiguousarray(probs.transpose(0, 3, 2, 1))))
        out = torch.stack(outputs)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
            out.is_batch = inputs.is_batch
        return out


class SaveCTMaskd(MapTransform):
    """Write a (1, x, y, z) label map as `<output_dir>/<case>.nii.gz` (uint8) through `ctseg.io`.

    The affine comes from the label's own MetaTensor metadata, which `LoadCTSeriesd` set from the
    CT, so the file carries exactly the geometry `ctseg convert` gives that CT.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | Path, name_key: str = "case",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            if not isinstance(labels, MetaTensor):
                raise CTSegError(f"SaveCTMaskd: {key!r} carries no affine (not a MetaTensor)")
            array = labels.detach().cpu().numpy()
            if array.ndim != 4 or array.shape[0] != 1:
                raise CTSegError(f"SaveCTMaskd: expected a (1, x, y, z) label map, got {array.shape}")
            path = output_path(self.output_dir, str(d[self.name_key]))
            save_nifti(np.rint(array[0]).astype(np.uint8).transpose(2, 1, 0),
                       labels.affine.cpu().numpy(), path, kind="label")
            log.info("wrote %s", path)
        return d

