"""DICOM series loading: ctseg.io.load_series against SimpleITK's ImageSeriesReader.

Both read the same files from a warm page cache, alternating, several times; the table gives
median and best wall time. SimpleITK's time covers GetGDCMSeriesFileNames (its header scan and
sort) plus Execute (an int16 image in memory, no copy to numpy); ctseg's covers everything up
to a float32 HU array with the validated geometry. Without the shared LCTSC data, a 150-slice
512x512 phantom series is generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ctseg.io import load_series

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/lctsc/Images/Case_000"


def _sitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _time(fn, folder: Path) -> float:
    start = time.perf_counter()
    result = fn(folder)
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def run(folder: Path, repeats: int) -> None:
    volume = load_series(folder)  # also warms the page cache
    image = _sitk(folder)
    same = np.array_equal(volume.array, sitk.GetArrayFromImage(image))
    del image
    times = {"ctseg.io.load_series": [], "SimpleITK ImageSeriesReader": []}
    for _ in range(repeats):
        times["SimpleITK ImageSeriesReader"].append(_time(_sitk, folder))
        times["ctseg.io.load_series"].append(_time(load_series, folder))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["SimpleITK ImageSeriesReader"] / medians["ctseg.io.load_series"]
    z, y, x = volume.shape
    print(f"series: {folder.name}, {z} slices of {y}x{x}; voxels identical: {same}; "
          f"{repeats} alternating runs; {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"SimpleITK {sitk.Version.VersionString()}\n")
    print("| loader | median s | best s | slices/s (median) |")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {medians[name]:.3f} | {min(values):.3f} | {z / medians[name]:.0f} |")
    print(f"\nspeed-up of ctseg over SimpleITK (median): {ratio:.2f}x")


def main(run=run, description: str = __doc__.splitlines()[0]) -> None:
    """`run(folder, repeats)` on `--series`, the LCTSC Case_000 when present, else a 150-slice phantom
    (bench_loader_steps.py shares this)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--series", type=Path, default=None,
                        help=f"DICOM series folder (default {DEFAULT} if present, else a phantom)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    folder = args.series or (DEFAULT if DEFAULT.is_dir() else None)
    if folder is not None:
        run(folder, args.repeats)
        return
    from ctseg.data.phantom import write_phantom_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = write_phantom_dataset(tmp, n_cases=1, rows=512, cols=512, slices=150)
        run(root / "Images" / "Phantom_000", args.repeats)


if __name__ == "__main__":
    main()
