"""Training throughput of the study's versions against MONAI's BasicUNet, and run-folder summaries.

Part 1 (always): training slices/s at 256x256 of each study version (ver1-ver5 through the
registry) and of MONAI's `BasicUNet` sized to about the same parameter count, measured in one
process, alternating, on the same batches. A step is what `ctseg train` does per batch: the slice
dataset over cached volumes with the version's augmentation (ver1: none), DiceCELoss, backward,
gradient clipping, Adam. Data: the LCTSC cases when present, else a generated phantom.

Part 2 (`--runs RUN_DIR ...`): one row per finished run folder: wall time, slices/s, best
validation volume Dice and HD95, and the best Dice reached within the first 5 minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet

from ctseg.data import discover_cases
from ctseg.data.cache import cache_cases
from ctseg.data.dataset import ForegroundRatioSampler, SliceDataset
from ctseg.networks import build_network
from ctseg.data.phantom import ensure_phantom
from ctseg.transforms import train_transforms

LCTSC = Path(__file__).resolve().parents[1].parent / "shared/data/lctsc"
AUGMENT = {
    "rotate": {"prob": 0.3, "degrees": 10}, "scale": {"prob": 0.3, "range": 0.1},
    "elastic": {"prob": 0.1, "spacing": 32, "magnitude": [1, 3]},
    "contrast": {"prob": 0.2, "gamma": [0.8, 1.25]}, "noise": {"prob": 0.2, "std_hu": 20},
}
VERSIONS = [("ver1", "unet", False), ("ver2", "unet", True), ("ver3", "unet_spconv", True),
            ("ver4", "unet_ra", True), ("ver5", "unet_mcnet", True)]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _basic_unet_like(target: int) -> tuple[BasicUNet, tuple[int, ...]]:
    """MONAI's BasicUNet with widths (f, f, 2f, 4f, 8f, f) scaled to about `target` parameters."""
    best = None
    for f in range(4, 65, 2):
        feats = (f, f, 2 * f, 4 * f, 8 * f, f)
        n = _params(BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=feats))
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, feats)
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=best[1]), best[1]


def _data(size: int):
    """Cached training volumes (the preprocessing cache `ctseg train` uses; filled if needed)."""
    config = {"data": {"size": [size, size], "window": [-1000, 400]},
              "phantom": {"cases": 2, "seed": 0, "rows": 256, "cols": 256, "slices": 48}}
    if LCTSC.is_dir():
        case_dir, source = LCTSC, "LCTSC (3 cases)"
    else:
        case_dir, source = ensure_phantom(config), "phantom (2 cases, 256x256x48)"
    return cache_cases(discover_cases(case_dir), config), source


def _loader(cached, augment: bool, batch: int, steps: int, seed: int) -> DataLoader:
    config = {"data": {"window": [-1000, 400]}, "augment": AUGMENT if augment else {}}
    dataset = SliceDataset(cached, 1, train_transforms(config))
    g = torch.Generator().manual_seed(seed)
    sampler = ForegroundRatioSampler(dataset.foreground, batch * steps, 0.7, g)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=0, generator=g)


def _time_training(model: torch.nn.Module, loader: DataLoader, warmup: int) -> float:
    """Slices/s over the timed steps (after `warmup` untimed ones), data loading included."""
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    slices, start = 0, None
    for i, batch in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(batch["image"]), batch["label"].float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= warmup:
            slices += batch["image"].shape[0]
    return slices / (time.perf_counter() - start)


def speed_table(size: int, features: list[int], batch: int, steps: int, repeats: int) -> None:
    cached, source = _data(size)
    models = {name: (lambda n=net: build_network(n, 1, 1, features=features), aug)
              for name, net, aug in VERSIONS}
    target = _params(build_network("unet", 1, 1, features=features))
    _, basic_feats = _basic_unet_like(target)
    models["MONAI BasicUNet"] = (
        lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=basic_feats), True)
    results: dict[str, list[float]] = {name: [] for name in models}
    params = {name: _params(make()) for name, (make, _) in models.items()}
    for r in range(repeats):  # alternate the models so a load change hits all of them alike
        for name, (make, aug) in models.items():
            torch.manual_seed(0)
            results[name].append(_time_training(make(), _loader(cached, aug, batch, steps + 1, r), 1))
    print(f"data: {source}; input {size}x{size}, batch {batch}, {steps} timed steps x {repeats} "
          f"alternating repeats; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {platform.processor() or platform.machine()}")
    print(f"study versions: features {features}; BasicUNet features {list(basic_feats)}\n")
    print("| model | params | training slices/s (median) | best | vs BasicUNet |")
    print("| --- | --- | --- | --- | --- |")
    base = statistics.median(results["MONAI BasicUNet"])
    for name, values in results.items():
        med = statistics.median(values)
        print(f"| {name} | {params[name] / 1e6:.2f}M | {med:.1f} | {max(values):.1f} | {med / base:.2f}x |")


def run_table(run_dirs: list[Path]) -> None:
    print("\n| run | network | epochs | train wall s | slices/s | best val Dice (epoch) | HD95 mm "
          "| best Dice within 5 min (at s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in run_dirs:
        m = json.loads((run / "metrics.json").read_text())
        with open(run / "history.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        elapsed, best5, at = 0.0, float("nan"), 0.0
        for row in rows:
            elapsed += float(row["epoch_seconds"])
            if elapsed > 300:
                break
            if not float(row["val_dice"]) <= best5:  # also true while best5 is NaN
                best5, at = float(row["val_dice"]), elapsed
        hd95 = m.get("best_val_hd95_mm")
        print(f"| {run.name} | {m['network']} | {m['epochs']} | {m['train_seconds']:.0f} | "
              f"{m['slices_per_second']:.1f} | {m['best_val_dice']:.4f} ({m['best_epoch']}) | "
              f"{hd95 if hd95 is None else f'{hd95:.2f}'} | {best5:.4f} ({at:.0f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--features", default="16,32,64,128")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="run folders to summarise")
    args = parser.parse_args()
    speed_table(args.size, [int(f) for f in args.features.split(",")], args.batch, args.steps, args.repeats)
    if args.runs:
        run_table(args.runs)


if __name__ == "__main__":
    main()
