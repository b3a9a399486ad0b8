"""Markdown tables of `ctseg cv` folders, for docs/benchmarks.md: one row per test case, then the
summary (mean ± sd, worst) against the issue-12 targets, read from each folder's cv.csv and
summary.json (nothing recomputed, nothing typed by hand).

    PYTHONPATH=. .venv/bin/python benchmarks/cv_table.py runs/cv-lctsc runs/cv-lctsc-5min
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

TARGETS = {"mean Dice": ">= 0.990 (5-minute budget: >= 0.980)", "every fold Dice": ">= 0.985",
           "HD95": "<= 3 mm", "training per fold": "<= 30 min"}


def table(folder: Path) -> str:
    rows = list(csv.DictReader((folder / "cv.csv").open()))
    summary = json.loads((folder / "summary.json").read_text())["metrics"]
    lines = [f"`{folder}`", "",
             "| fold | test case | Dice | IoU | HD95 mm | ASSD mm | NSD | epochs | training s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['fold']} | {r['case']} | {float(r['dice']):.4f} | {float(r['iou']):.4f} | "
                     f"{float(r['hd95_mm']):.2f} | {float(r['assd_mm']):.2f} | {float(r['nsd']):.3f} | "
                     f"{r['epochs']} | {float(r['train_seconds']):.0f} |")
    dice, hd95 = summary["dice"], summary["hd95_mm"]
    longest = max(float(r["train_seconds"]) for r in rows) / 60
    lines += ["", "| figure | value | target |", "| --- | --- | --- |",
              f"| mean Dice ± sd over cases | {dice['mean']:.4f} ± {dice['sd']:.4f} | {TARGETS['mean Dice']} |",
              f"| worst case Dice | {dice['min']:.4f} | {TARGETS['every fold Dice']} |",
              f"| HD95 mean / worst | {hd95['mean']:.2f} / {hd95['max']:.2f} mm | {TARGETS['HD95']} |",
              f"| longest fold's training | {longest:.1f} min | {TARGETS['training per fold']} |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+")
    for folder in parser.parse_args().folders:
        print(table(folder))


if __name__ == "__main__":
    main()
