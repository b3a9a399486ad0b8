"""Where a cross-validation misses lung, and how each case's lungs differ: for docs/experiments/recipe.md.

Per case of a labelled case folder: lung volume and the HU percentiles inside the true lung mask
(the network's input is windowed HU, so a case whose lungs are darker than the training cases' is
out of the intensity range training saw). Per `ctseg cv` folder given: for each test case, the
missed (false-negative) and extra (false-positive) voxels, the median HU of the missed ones, and
the share of missed voxels in each third of the lung's z extent (ascending z runs from the
feet to the head in head-first axial scans).

    PYTHONPATH=. .venv/bin/python benchmarks/cv_misses.py --cases ../shared/data/lctsc runs/cv-lctsc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from ctseg.data import discover_cases
from ctseg.data.cache import load_case_volume
from ctseg.io.masks import load_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", required=True, help="labelled case folder")
    parser.add_argument("cv", nargs="*", type=Path, help="ctseg cv output folders (predictions/*.nii.gz)")
    args = parser.parse_args()
    print("| case | slices | lung ml | lung HU p5 / p25 / p50 / p75 / p95 |")
    print("| --- | --- | --- | --- |")
    volumes = {}
    for case in discover_cases(args.cases):
        ct = load_case_volume(case)
        lung = load_mask(case.label, ct) > 0
        volumes[case.name] = (ct, lung)
        ml = lung.sum() * float(np.prod(ct.spacing)) / 1000
        pct = " / ".join(f"{v:.0f}" for v in np.percentile(ct.array[lung], [5, 25, 50, 75, 95]))
        print(f"| {case.name} | {lung.shape[0]} | {ml:.0f} | {pct} |")
    for folder in args.cv:
        print(f"\n`{folder}`\n")
        print("| test case | missed voxels | extra voxels | missed HU median | missed in inferior / middle / superior third (by ascending z) |")
        print("| --- | --- | --- | --- | --- |")
        for name, (ct, lung) in volumes.items():
            path = folder / "predictions" / f"{name}.nii.gz"
            if not path.is_file():
                continue
            pred = np.asarray(nib.load(path).dataobj).transpose(2, 1, 0) > 0  # (x, y, z) -> (z, y, x)
            missed, extra = lung & ~pred, pred & ~lung
            z = np.flatnonzero(lung.any(axis=(1, 2)))
            thirds = np.array_split(np.arange(z.min(), z.max() + 1), 3)
            share = [missed[t].sum() / max(missed.sum(), 1) for t in thirds]
            hu = f"{np.median(ct.array[missed]):.0f}" if missed.any() else "n/a"
            print(f"| {name} | {missed.sum():,} | {extra.sum():,} | {hu} | "
                  + " / ".join(f"{s:.0%}" for s in share) + " |")


if __name__ == "__main__":
    main()
