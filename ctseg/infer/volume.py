"""The one slice-wise inference path: HU volume in, labels and probabilities at original resolution out.

Training validation and `ctseg predict` both call `predict_volume`, so the Dice logged during
training is measured through exactly the code users run. Preprocessing is read from the model's
config by `ctseg.slices` (torch alone, tested equal to the MONAI `preprocess_transforms` the
training cache used, so `ctseg predict` never imports MONAI): HU window to [0, 1], resize every
slice to `data.size`, stack `data.context` neighbours as channels, run the 2D network over the
slices in batches (`infer.batch_size` slices per forward pass, `auto` by device; float16 autocast
on CUDA unless `infer.amp: false`), optionally average flipped copies (`infer.tta`: list of flip
axes, 0 = rows, 1 = columns), and resize the class probabilities back to the original (y, x)
before thresholding, so boundaries are placed at sub-pixel precision rather than by up-sampling a
coarse label map. With `data.spacing` set, each volume is first cropped or padded (air) to the
body-centred box of original pixels the input covers (`ctseg.geometry`, from the source's in-plane
spacing), and the probabilities, resized back to that box, are placed into the original grid
(background outside it). Settings are read through the schema's typed view (`ctseg.config.config_view`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ctseg.config import config_view
from ctseg.errors import ModelError
from ctseg.geometry import AIR_HU, Box, background_fill, crop_or_pad, fov_box, uncrop
from ctseg.slices import (context_slices, num_classes, output_channels, preprocess_slices, resize_slices,
                          stack_context, training_size)

__all__ = ["field_of_view", "inference_batch_size", "num_classes", "output_channels", "predict_volume",
           "preprocess_volume"]

# Slices per forward pass for `infer.batch_size: auto`. On CPU small batches keep a layer's
# activations in cache: the lung U-Net (8..64 features, 256x256) runs ~25 slices/s at 2-4 slices
# per batch and ~13 slices/s at 32 on 2 cores. GPUs want large batches.
AUTO_BATCH = {"cpu": 4, "cuda": 32}
# Devices where slices enter the network channels-last (NHWC). On CPU too: the LCTSC model ran 63
# against 36 slices/s NCHW at 4 per batch on an idle 2-core machine (issue 16), and faster at
# every batch size in benchmarks/bench_infer_choices.py (docs/benchmarks.md), with identical masks.
CHANNELS_LAST = ("cpu", "cuda")


def inference_batch_size(config: dict, device: torch.device) -> int:
    """`infer.batch_size`, with `auto` (the default) resolved for `device`."""
    value = config_view(config).infer.batch_size  # checked by the schema: auto, null or 1..4096
    if value in (None, "auto"):
        return AUTO_BATCH.get(device.type, AUTO_BATCH["cuda"])
    return int(value)


def field_of_view(hu_zyx: np.ndarray | torch.Tensor, config: dict,
                  spacing_yx: tuple[float, float] | None) -> Box | None:
    """The box of original pixels the network input covers (`ctseg.geometry.fov_box`), or None
    when `data.spacing` is null (every slice resized whole)."""
    cfg = config_view(config)
    if cfg.spacing is None:
        return None
    if spacing_yx is None:
        raise ModelError(f"the model was trained at data.spacing={list(cfg.spacing)} mm per pixel: "
                         "inference needs the volume's in-plane spacing (spacing_yx)")
    hu = hu_zyx.detach().cpu().numpy() if isinstance(hu_zyx, torch.Tensor) else np.asarray(hu_zyx)
    return fov_box(hu, tuple(spacing_yx), cfg.spacing, cfg.size)


def preprocess_volume(hu_zyx: np.ndarray | torch.Tensor, config: dict, *,
                      spacing_yx: tuple[float, float] | None = None, box: Box | None = None) -> torch.Tensor:
    """(z, y, x) HU -> (z, k, H, W) network input, exactly as training saw its slices.

    `spacing_yx` (mm) is required when `data.spacing` is set; `box` skips finding the field again.
    """
    if isinstance(hu_zyx, torch.Tensor):
        hu = hu_zyx.detach().to("cpu", torch.float32)
    else:  # a copy: cached volumes are read-only memory maps
        hu = torch.from_numpy(np.array(hu_zyx, dtype=np.float32))
    if hu.ndim != 3:
        raise ModelError(f"expected a (z, y, x) volume, got shape {tuple(hu.shape)}")
    box = box or field_of_view(hu, config, spacing_yx)
    if box is not None:
        hu = torch.from_numpy(crop_or_pad(hu.numpy(), box, AIR_HU))
    return stack_context(preprocess_slices(hu, config), context_slices(config))


@torch.inference_mode()
def predict_volume(model: torch.nn.Module, hu_zyx: np.ndarray | torch.Tensor, config: dict,
                   device: torch.device | str | None = None,
                   on_slices: Callable[[int, int], None] | None = None, *,
                   probabilities: bool = True,
                   spacing_yx: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment a (z, y, x) HU volume slice by slice.

    Returns `labels` (z, y, x) uint8 and `probabilities` (num_classes, z, y, x) float32 (for a
    binary model: background, foreground), both at the input's resolution. With
    `probabilities=False` the second is None and never built: a binary model then resizes and
    thresholds its one foreground channel only (the same labels, without a two-channel volume).
    `on_slices(done, total)` is called after each forward pass (total counts every TTA pass), for
    progress bars. `spacing_yx`: the volume's in-plane (row, column) spacing in mm, required when
    the model's `data.spacing` is set.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    box = field_of_view(hu_zyx, config, spacing_yx)
    inputs = preprocess_volume(hu_zyx, config, box=box)
    depth, rows, cols = tuple(hu_zyx.shape)
    out_rows, out_cols = (box.rows, box.cols) if box is not None else (rows, cols)
    expected = getattr(model, "in_channels", None)
    if expected is not None and expected != inputs.shape[1]:
        raise ModelError(f"the model takes {expected} input channel(s) but the config gives "
                         f"{inputs.shape[1]} (data.context)")
    infer = config_view(config).infer
    cuda = device.type == "cuda"
    amp = cuda and infer.amp
    batch = inference_batch_size(config, device)

    def inferer(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([network(x[i:i + batch].to(device)).cpu() for i in range(0, depth, batch)])

    flips = list(infer.tta)
    total, done = depth * (1 + len(flips)), 0

    def network(x: torch.Tensor) -> torch.Tensor:
        nonlocal done
        if device.type in CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
        if on_slices is not None:
            done += x.shape[0]
            on_slices(done, total)
        return _activate(logits.float(), config)

    was_training = model.training
    model.eval()
    try:
        probs = inferer(inputs)
        for axis in flips:
            dims = (2 + axis,)
            probs = probs + inferer(inputs.flip(dims)).flip(dims)
        probs = probs / (1 + len(flips))
    finally:
        model.train(was_training)

    # (z, C, H, W) -> (C*z, y, x) at the original in-plane size (or the box's), then (C, z, y, x).
    channels = probs.shape[1]
    probs = probs.permute(1, 0, 2, 3).reshape(channels * depth, *probs.shape[2:])
    probs = resize_slices(probs, (out_rows, out_cols)).reshape(channels, depth, out_rows, out_cols)
    if box is not None:  # outside the field of view: background
        probs = torch.from_numpy(uncrop(probs.numpy(), box, (rows, cols), background_fill(channels)))
    if channels == 1:
        foreground = probs[0].clamp_(0.0, 1.0)
        labels = (foreground >= float(infer.threshold)).to(torch.uint8)
        if not probabilities:
            return labels.numpy(), None
        probs = torch.stack([1.0 - foreground, foreground])
    else:
        labels = probs.argmax(dim=0).to(torch.uint8)
    if not probabilities:
        return labels.numpy(), None
    return labels.numpy(), probs.numpy().astype(np.float32, copy=False)


def _activate(logits: torch.Tensor, config: dict) -> torch.Tensor:
    if logits.shape[1] != output_channels(config):
        raise ModelError(f"the model gives {logits.shape[1]} output channel(s) but data.num_classes="
                         f"{num_classes(config)} needs {output_channels(config)}")
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
