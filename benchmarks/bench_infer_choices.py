"""Measured choices of the inference path: memory format, slices per batch, BatchNorm folding, gzip level.

Forward passes of the trained model (`--model`, default runs/lctsc: the README's LCTSC run) over
`--slices` real 256x256 slices (LCTSC Case_009 when present, else a phantom), variants alternating round by round in one process, median of
`--rounds`; each variant's foreground (sigmoid >= 0.5) is compared pixel by pixel with plain NCHW.
Then the label NIfTI of a real mask written at gzip levels 1, 6 and 9 (alternating, medians).
Run: PYTHONPATH=. python benchmarks/bench_infer_choices.py [--model RUN] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
LCTSC = REPO.parent / "shared/data/lctsc"


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval copy of `model` with each BatchNorm that follows a convolution in a `Sequential`
    folded into it (torch's `fuse_conv_bn_eval`)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, torch.nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], torch.nn.Conv2d) and isinstance(module[i + 1], torch.nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = torch.nn.Identity()
    return folded


def _inputs(config: dict, slices: int) -> torch.Tensor:
    from ctseg.io import load_image
    from ctseg.infer.volume import preprocess_volume

    case = LCTSC / "Images" / "Case_009"
    if case.exists():
        volume = load_image(case)
        hu, spacing_yx = volume.array, volume.spacing[1:]
    else:
        from ctseg.data.phantom import phantom_case
        hu, _, geometry = phantom_case(np.random.default_rng(0), rows=512, cols=512, slices=slices)
        spacing_yx = (geometry.pixel_spacing, geometry.pixel_spacing)
    mid = hu.shape[0] // 2
    return preprocess_volume(hu[max(mid - slices // 2, 0): mid + slices // 2], config, spacing_yx=spacing_yx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "runs/lctsc"))
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from ctseg.infer.model_loader import load_model

    loaded = load_model(args.model, device="cpu")
    model = loaded.model.eval()
    x = _inputs(loaded.config, args.slices)
    folded = fold_batchnorm(model)
    variants = {f"{name}{'+cl' if fmt == 'channels_last' else ''} b{b}": (net, fmt, b)
                for name, net in (("nchw", model), ("folded", folded))
                for fmt in ("nchw", "channels_last") for b in (2, 4, 8)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    masks: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for key, (net, fmt, batch) in variants.items():
                memory = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                net = net.to(memory_format=memory)
                start = time.perf_counter()
                out = [net(x[i:i + batch].contiguous(memory_format=memory)) for i in range(0, len(x), batch)]
                times[key].append(time.perf_counter() - start)
                masks[key] = torch.cat(out) >= 0
    base = masks["nchw b4"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(x)} slices, "
          f"{args.rounds} rounds (medians; measured on a shared, loaded machine)")
    for key, t in times.items():
        diff = int((masks[key] != base).sum())
        print(f"{key:16s} {len(x) / statistics.median(t):6.1f} slices/s  pixels differing from nchw b4: {diff}")

    from ctseg.io.nifti import save_nifti
    truth = LCTSC / "Segmentations/Case_000_seg.npz"  # a real lung mask, (z, y, x)
    labels = (np.load(truth)["masks"].astype(np.uint8) if truth.exists()
              else masks["nchw b4"][:, 0].numpy().astype(np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        raw = save_nifti(labels, np.eye(4), Path(tmp) / "mask.nii", kind="label").read_bytes()
    sizes, secs = {}, {level: [] for level in (1, 6, 9)}
    for _ in range(args.rounds):
        for level in secs:
            start = time.perf_counter()
            sizes[level] = len(gzip.compress(raw, compresslevel=level, mtime=0))
            secs[level].append(time.perf_counter() - start)
    print(f"label NIfTI {labels.shape}, {len(raw) / 1e6:.1f} MB raw")
    for level in secs:
        print(f"gzip level {level}: {sizes[level] / 1e3:8.1f} kB  {statistics.median(secs[level]):.3f} s")


if __name__ == "__main__":
    main()
