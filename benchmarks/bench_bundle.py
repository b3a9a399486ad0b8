"""The exported MONAI bundle run as users run it, timed, and checked against `ctseg predict`.

Times the literal `python -m monai.bundle run --config_file BUNDLE/configs/inference.yaml
--dataset_dir DATA --output_dir OUT [--tracking mlflow]` (wall time of the process, plus the
engine's own "Time taken" when MONAI/ignite logs it), then `ctseg predict --model RUN` on the
same data, and reports whether the masks are voxel-identical with identical affines.
Needs `--bundle` (from `ctseg export-bundle RUN --output BUNDLE`) and `--data`; skipped without.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def _timed(argv: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def _engine_seconds(log: str) -> float | None:
    found = re.findall(r"Engine run (?:complete|finished)\. Time taken: (\d+):(\d+):([\d.]+)", log)
    return sum(float(h) * 3600 + float(m) * 60 + float(s) for h, m, s in found) if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="exported bundle folder")
    parser.add_argument("--data", type=Path, help="case folder (--dataset_dir)")
    parser.add_argument("--run", type=Path, default=None,
                        help="run folder for `ctseg predict` (default: the bundle itself)")
    parser.add_argument("--tracking", action="store_true", help="pass --tracking mlflow, as the docs did")
    args = parser.parse_args()
    if args.bundle is None or args.data is None:
        print("skipped: needs --bundle BUNDLE --data CASE_DIR")
        return 0
    env_note = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle_argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                       str(args.bundle.resolve() / "configs/inference.yaml"), "--dataset_dir",
                       str(args.data.resolve()), "--output_dir", str(tmp / "bundle")]
        if args.tracking:
            bundle_argv += ["--tracking", "mlflow"]
        bundle_s, log = _timed(bundle_argv, tmp)
        predict_s, _ = _timed([sys.executable, "-m", "ctseg.cli", "predict", "--model",
                               str((args.run or args.bundle).resolve()), "--input", str(args.data.resolve()),
                               "--output", str(tmp / "ctseg")], tmp)
        names = sorted(p.name for p in (tmp / "ctseg").glob("*.nii.gz"))
        identical = []
        for name in names:
            a, b = nib.load(tmp / "bundle" / name), nib.load(tmp / "ctseg" / name)
            identical.append(np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
                             and np.array_equal(a.affine, b.affine))
    engine = _engine_seconds(log)
    print(f"bundle {args.bundle}, data {args.data} ({len(names)} cases); {env_note}\n")
    print("| command | wall s |")
    print("| --- | --- |")
    print(f"| python -m monai.bundle run{' --tracking mlflow' if args.tracking else ''} | {bundle_s:.1f}"
          f"{f' (engine {engine:.1f})' if engine is not None else ''} |")
    print(f"| ctseg predict --model {args.run or args.bundle} | {predict_s:.1f} |")
    print(f"\nmasks voxel-identical with identical affines: {sum(identical)} of {len(names)}")
    return 0 if names and all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
