"""Post-processing time: ctseg's scipy.ndimage steps against MONAI's transforms, same labels.

The raw (unprocessed) labels of a trained run (`--model`, default runs/lctsc) on the shared LCTSC
cases (or a phantom case when ../shared is absent) are post-processed by
`ctseg.infer.postprocess.postprocess_labels` and by the MONAI `Compose` of the same
`postprocess_steps`, alternating, median of `--rounds`; the two outputs must be equal.
Run: PYTHONPATH=. python benchmarks/bench_postprocess.py [--model RUN] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import monai.transforms as mt
import numpy as np
import torch

from ctseg.infer.model_loader import load_model
from ctseg.infer.postprocess import postprocess_labels, postprocess_steps
from ctseg.infer.volume import num_classes, predict_volume
from ctseg.io import load_image

REPO = Path(__file__).resolve().parents[1]
LCTSC = REPO.parent / "shared/data/lctsc/Images"


def monai_postprocess(labels_zyx: np.ndarray, steps) -> np.ndarray:
    volume = torch.from_numpy(np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)))[None]
    out = mt.Compose([getattr(mt, name)(**kwargs) for name, kwargs in steps])(volume)
    return np.asarray(out)[0].transpose(2, 1, 0).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "runs/lctsc"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu")
    steps = postprocess_steps(loaded.config, num_classes(loaded.config))
    cases = sorted(LCTSC.iterdir()) if LCTSC.is_dir() else [REPO / ".cache/phantom/Images/Phantom_000"]
    print(f"{args.rounds} rounds, medians; steps {[name for name, _ in steps]}")
    print("| case | slices | MONAI s | ctseg (scipy) s | equal |\n|---|---|---|---|---|")
    for case in cases:
        volume = load_image(case)
        labels, _ = predict_volume(loaded.model, volume.array, loaded.config, "cpu", probabilities=False,
                                   spacing_yx=volume.spacing[1:])
        times = {"monai": [], "ctseg": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            reference = monai_postprocess(labels, steps)
            times["monai"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ours = postprocess_labels(labels, steps)
            times["ctseg"].append(time.perf_counter() - start)
        print(f"| {case.name} | {labels.shape[0]} | {statistics.median(times['monai']):.2f} | "
              f"{statistics.median(times['ctseg']):.2f} | {np.array_equal(reference, ours)} |")


if __name__ == "__main__":
    main()
