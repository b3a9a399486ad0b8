"""CPU time of `ctseg.body.body_mask` on a 512x512x150 phantom and on the cases of a folder.

    python benchmarks/bench_body.py [--case-dir DIR] [--rounds 3]

Prints a Markdown table of process CPU time (median of `--rounds`) beside wall time: on a
shared, loaded machine the wall time measures the neighbours as much as the code. With `--case-dir` (labelled cases), it
also counts truth lung voxels that fall outside the body mask (should be 0).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ctseg.body import body_mask
from ctseg.data import discover_cases
from ctseg.data.phantom import phantom_case
from ctseg.io import load_mask, load_series


def timed(hu: np.ndarray, rounds: int) -> tuple[np.ndarray, float, float]:
    cpu, wall = [], []
    for _ in range(rounds):
        c, w = time.process_time(), time.perf_counter()
        body = body_mask(hu)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return body, statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case-dir", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hu, lungs, _ = phantom_case(np.random.default_rng([0, 0]), 512, 512, 150)
    body, cpu, wall = timed(hu, args.rounds)
    print("| volume | shape (z, y, x) | CPU s | wall s | truth lung voxels outside the body |")
    print("| --- | --- | ---: | ---: | ---: |")
    print(f"| phantom | {hu.shape} | {cpu:.2f} | {wall:.2f} | {int((lungs.astype(bool) & ~body).sum())} |")
    for case in discover_cases(args.case_dir) if args.case_dir else []:
        volume = load_series(case.image)
        body, cpu, wall = timed(volume.array, args.rounds)
        outside = int((load_mask(case.label, volume).astype(bool) & ~body).sum()) if case.label else -1
        print(f"| {case.name} | {volume.shape} | {cpu:.2f} | {wall:.2f} | {outside if outside >= 0 else 'n/a'} |")


if __name__ == "__main__":
    main()
