"""Memory of `ctseg predict` over many cases: resident memory after each case must stay flat.

Writes N phantom cases (real DICOM) and trains a tiny model on 3 others (or takes `--model`),
then runs the same path as `ctseg predict` (`ctseg.infer.cases.predict_cases`, each mask
written as NIfTI) and reads the process's resident set size (VmRSS) after every case. A leak of
one volume per case would add its size (`volume MB` below) at each step; flat means the growth
from the first cases to the last stays well below one volume. Linux only (/proc/self/status).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tiny_model(root: Path) -> Path:
    from ctseg.data.phantom import write_phantom_dataset
    from ctseg.train import train

    cases = write_phantom_dataset(root / "train_cases", n_cases=3, seed=99, rows=64, cols=64, slices=12)
    config = {"data": {"size": [64, 64], "cache_dir": str(root / "cache")},
              "model": {"name": "unet", "features": [8, 16, 32]},
              "train": {"epochs": 1, "batch_size": 8, "early_stopping": None},
              "split": {"val_fraction": 0.34}, "tracking": {"enabled": False}}
    return train(config, cases, root / "run", device="cpu")


def run(args: argparse.Namespace, root: Path) -> None:
    from ctseg.data.phantom import write_phantom_dataset
    from ctseg.infer.cases import predict_cases
    from ctseg.infer.model_loader import load_model

    start = time.perf_counter()
    cases = write_phantom_dataset(root / "cases", n_cases=args.cases, seed=7, rows=args.rows,
                                  cols=args.rows, slices=args.slices)
    print(f"wrote {args.cases} phantom cases in {time.perf_counter() - start:.0f} s", flush=True)
    model = args.model or tiny_model(root)
    loaded = load_model(model, device=args.device)
    gc.collect()
    before = rss_mb()
    samples: list[tuple[str, float, float]] = []

    def record(result) -> None:
        samples.append((result.case, rss_mb(), result.seconds))
        if not result.ok:
            print(f"{result.case} failed: {result.error}")

    results = predict_cases(loaded, root / "cases", root / "pred", on_result=record)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    volume_mb = args.slices * args.rows * args.rows * 4 / 2**20
    ok = sum(r.ok for r in results)
    print(f"\n{ok}/{len(results)} cases of {args.slices}x{args.rows}x{args.rows} (one float32 volume "
          f"= {volume_mb:.1f} MB); model {model}; device {next(loaded.model.parameters()).device}; "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}\n")
    print("| after case | RSS MB | growth since case 5, MB | seconds for the case |")
    print("| --- | --- | --- | --- |")
    warm = samples[min(4, len(samples) - 1)][1]
    shown = sorted({0, 1, 4, 9, 19, 29, 39, len(samples) - 1} & set(range(len(samples))))
    for i in shown:
        case, rss, seconds = samples[i]
        print(f"| {i + 1} ({case}) | {rss:.0f} | {rss - warm:+.1f} | {seconds:.2f} |")
    tail = [rss for _, rss, _ in samples[4:]]
    slope = (tail[-1] - tail[0]) / max(len(tail) - 1, 1)
    print(f"\nRSS before the first case {before:.0f} MB, peak of the process {peak:.0f} MB; from case 5 "
          f"to case {len(samples)}: {tail[-1] - tail[0]:+.1f} MB in all, {slope:+.2f} MB per case "
          f"({slope / volume_mb:+.3f} volumes per case), range {min(tail):.0f}..{max(tail):.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--rows", type=int, default=256, help="rows = columns of each slice")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--model", type=Path, default=None,
                        help="run folder, checkpoint or bundle (default: train a tiny one)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
