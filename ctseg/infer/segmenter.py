"""Segment CT volumes in memory with a model loaded once: the Python API behind `ctseg predict`.

    from ctseg.infer import Segmenter
    from ctseg.io import load_image

    segmenter = Segmenter.load("runs/lctsc")            # run folder, checkpoint or bundle, once
                                                        # (Segmenter.load(): the packaged lung model)
    for path in ["case1/", "case2.nii.gz"]:
        labels = segmenter(load_image(path))            # (z, y, x) uint8 on the CT's grid

A volume is a `CTVolume` (what `ctseg.io.load_image` returns) or a (z, y, x) HU array (then
`split_lungs`, and a model trained with `data.spacing`, need its `affine`). `ctseg predict` runs
every case through the same object, so the API and the command give the same masks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ctseg.config import config_view
from ctseg.errors import ConfigError
from ctseg.infer.lungs import split_lungs
from ctseg.infer.model_loader import LoadedModel, load_model
from ctseg.infer.postprocess import case_body, postprocess_labels, postprocess_steps
from ctseg.infer.volume import CHANNELS_LAST, num_classes, predict_volume
from ctseg.io.volume import CTVolume


@dataclass
class Segmentation:
    """Labels (z, y, x) uint8 after post-processing; class probabilities (C, z, y, x) float32
    before it, kept only when asked for (they are the largest array of a case)."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None


def inference_config(config: dict, tta: bool | None = None) -> dict:
    """The model's config with the command line's TTA choice applied (None keeps the model's).

    `tta=True` keeps the model's own flip axes when it has some, else flips the axes training
    augmented (`augment.flip.axes`), else left-right: only flips the network has learned to see.
    """
    config = copy.deepcopy(config)
    if tta is None:
        return config
    cfg = config_view(config)
    infer = config.setdefault("infer", {})
    if not tta:
        infer["tta"] = []
    elif not cfg.infer.tta:
        flip = cfg.augment.flip
        infer["tta"] = list(flip.axes) if flip is not None and flip.prob > 0 else [1]
    return config


class Segmenter:
    """A loaded model with its inference settings: call it on volumes to get label maps."""

    def __init__(self, loaded: LoadedModel, *, tta: bool | None = None, postprocess: bool = True,
                 split_lungs: bool | None = None) -> None:
        self.loaded = loaded
        if self.device.type in CHANNELS_LAST:  # weights NHWC like the inputs: 2.2x the forward rate
            loaded.model.to(memory_format=torch.channels_last)  # on 2 CPU cores (docs/benchmarks.md)
        self.config = inference_config(loaded.config, tta)
        self.classes = num_classes(self.config)
        self.steps = postprocess_steps(self.config, self.classes) if postprocess else []
        self.postprocess = postprocess
        self.split_lungs = bool(config_view(self.config).infer.split_lungs
                                if split_lungs is None else split_lungs)
        if self.split_lungs and self.classes != 2:
            raise ConfigError(f"split_lungs needs a binary lung model; {loaded.source} has "
                              f"{self.classes} classes")

    @classmethod
    def load(cls, model: str | Path | None = None, device: str | torch.device | None = None, *,
             trust_bundle: bool = False, default_model: str | Path | None = None,
             **settings) -> "Segmenter":
        """Load a run folder, checkpoint or bundle (`ctseg.infer.model_loader.load_model`); without
        `model`, the packaged default lung model (or the file `default_model` names)."""
        return cls(load_model(model, device=device, trust_bundle=trust_bundle, default=default_model),
                   **settings)

    @property
    def device(self) -> torch.device:
        return next(self.loaded.model.parameters()).device

    @property
    def label_names(self) -> dict[int, str]:
        """What each label value of the output means."""
        if self.split_lungs:
            return {1: "right lung", 2: "left lung"}
        return {1: "lung"} if self.classes == 2 else {v: f"label {v}" for v in range(1, self.classes)}

    def segment(self, volume: CTVolume | np.ndarray, affine: np.ndarray | None = None, *,
                probabilities: bool = False,
                on_slices: Callable[[int, int], None] | None = None,
                spacing_yx: tuple[float, float] | None = None) -> Segmentation:
        """Labels of one volume (and its class probabilities when asked for).

        A model trained with `data.spacing` needs the in-plane spacing (mm): a CTVolume carries it,
        an array needs `spacing_yx` or its RAS `affine` (for (x, y, z) indices)."""
        hu = volume.array if isinstance(volume, CTVolume) else np.asarray(volume)
        if isinstance(volume, CTVolume):
            affine = volume.affine
            spacing_yx = (float(volume.spacing[1]), float(volume.spacing[2]))
        elif spacing_yx is None and affine is not None:
            columns = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :2], axis=0)  # x, y steps
            spacing_yx = (float(columns[1]), float(columns[0]))
        labels, probs = predict_volume(self.loaded.model, hu, self.config, self.device, on_slices=on_slices,
                                       probabilities=probabilities, spacing_yx=spacing_yx)
        labels = postprocess_labels(labels, self.steps,
                                    body=case_body(self.config, hu) if self.postprocess else None)
        if self.split_lungs:
            if affine is None:
                raise ConfigError("split_lungs needs the volume's affine (give a CTVolume or affine=)")
            labels = split_lungs(labels, affine, hu)
        return Segmentation(labels, probs)

    def __call__(self, volume: CTVolume | np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
        return self.segment(volume, affine).labels
