"""Cold-process `ctseg predict` against the stock MONAI pipeline of issue 16, as a user runs them.

Each measurement is a fresh process from command to written masks (imports, model load, every
case): one case alone, then all cases in one call; ctseg and stock alternate within each round.
Reported per pipeline: median wall seconds, peak RSS (`os.wait4` of that process), seconds per
case inside the batch (ctseg: `predictions.csv`, the case's own read + segment + write; stock: its
loop) and the volume Dice of the last round's masks against the truth masks.

The stock pipeline is the straightforward one a MONAI user writes (stronger than
benchmarks/bench_infer.py's): `LoadImage(PydicomReader)` -> `ScaleIntensityRange` (ctseg's HU
window) -> `Resize` to the training size with mode `area` -> `SliceInferer` (4 slices per batch)
with `monai.networks.nets.UNet` channels (9, 18, 36, 72, 144), 2 residual units (0.51 M
parameters) -> sigmoid -> trilinear `Resize` back -> `AsDiscrete` -> `SaveImage` uint8. It skips
post-processing. Its network is untrained unless `--stock-weights` gives a state dict for it, so
without one its Dice is not reported (its time does not depend on the weights).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_end_to_end.py --model RUN \
        --cases ../shared/data/lctsc --rounds 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOCK_CHANNELS = (9, 18, 36, 72, 144)


def stock(args: argparse.Namespace) -> None:
    """The stock MONAI pipeline over `args.case` (a fresh process: this is what is timed)."""
    import numpy as np
    import torch
    from monai.inferers import SliceInferer
    from monai.networks.nets import UNet
    from monai.transforms import AsDiscrete, Compose, LoadImage, Resize, SaveImage, ScaleIntensityRange

    model = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=STOCK_CHANNELS,
                 strides=(2, 2, 2, 2), num_res_units=2).eval()
    if args.stock_weights:
        model.load_state_dict(torch.load(args.stock_weights, map_location="cpu", weights_only=True))
    lo, hi = args.window
    size = tuple(args.size)
    load = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
    pre = Compose([ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
                   Resize(spatial_size=(*size, -1), mode="area")])
    inferer = SliceInferer(roi_size=size, spatial_dim=2, sw_batch_size=4)
    threshold = AsDiscrete(threshold=0.5)
    save = SaveImage(output_dir=args.out, output_postfix="", output_ext=".nii.gz", separate_folder=False,
                     resample=False, output_dtype=np.uint8, print_log=False)
    cases = {}
    for case in args.case:
        start = time.perf_counter()
        image = load(case)
        x, y, z = image.shape[1:]
        with torch.inference_mode():
            probs = torch.sigmoid(inferer(pre(image)[None], model))[0]
        back = Resize(spatial_size=(x, y, z), mode="trilinear")(probs)
        save(threshold(back).to(torch.uint8))
        cases[Path(case).name] = {"seconds": time.perf_counter() - start, "slices": int(z)}
    print(json.dumps({"cases": cases}))


def timed(command: list[str], log: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of that process, stdout) of one child process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(f"{log}.out", "w+") as out, open(f"{log}.err", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"{' '.join(command[:4])} ... failed:\n{err.read()[-4000:]}")
        out.seek(0)
        return wall, usage.ru_maxrss / 1024, out.read()


def dice(pred: Path, case) -> float | None:
    """Volume Dice of a written mask against the case's truth, on the CT's grid (None: no truth)."""
    import numpy as np

    from ctseg.io import load_mask, load_series

    if case.label is None or not pred.is_file():
        return None
    volume = load_series(case.image)
    truth = load_mask(case.label, volume) > 0
    mask = load_mask(pred, volume) > 0
    return float(2 * np.logical_and(mask, truth).sum() / max(1, mask.sum() + truth.sum()))


def main(args: argparse.Namespace) -> None:
    from ctseg.config import read_yaml_file, resolve_config
    from ctseg.data import discover_cases
    from ctseg.slices import hu_window, training_size

    cases = discover_cases(args.cases)
    single = next(c for c in cases if args.single in (None, c.name))
    config = resolve_config(read_yaml_file(Path(args.model) / "config.yaml")) \
        if Path(args.model).is_dir() else None
    window = hu_window(config) if config else (-1000.0, 400.0)
    size = training_size(config) if config else (256, 256)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for round_ in range(args.rounds):
            for scope, inputs in (("one case", [single]), ("all cases", cases)):
                for pipeline in ("ctseg", "stock"):
                    out = Path(tmp) / f"{pipeline}-{scope.replace(' ', '-')}-{round_}"
                    if pipeline == "ctseg":
                        source = single.image if len(inputs) == 1 else Path(args.cases)
                        command = [sys.executable, "-m", "ctseg.cli", "predict", "--model", str(args.model),
                                   "--input", str(source), "--output", str(out), "--device", "cpu"]
                    else:
                        command = [sys.executable, __file__, "--stock", "--out", str(out),
                                   "--window", *map(str, window), "--size", *map(str, size),
                                   *sum((["--case", str(c.image)] for c in inputs), [])]
                        if args.stock_weights:
                            command += ["--stock-weights", str(args.stock_weights)]
                    wall, rss, stdout = timed(command, out)
                    if pipeline == "ctseg":
                        with open(out / "predictions.csv", newline="") as fh:
                            per_case = {r["case"]: float(r["seconds"]) for r in csv.DictReader(fh)}
                    else:
                        per_case = {k: v["seconds"] for k, v in
                                    json.loads(stdout.strip().splitlines()[-1])["cases"].items()}
                    runs.setdefault(f"{pipeline}, {scope}", []).append(
                        {"wall": wall, "rss_mb": rss, "per_case": per_case, "out": out})
                    print(f"round {round_}: {pipeline}, {scope}: {wall:.1f} s, {rss:.0f} MB", file=sys.stderr)
        last = {key: value[-1]["out"] for key, value in runs.items()}
        scores = {key: {c.name: dice(out / f"{c.name}.nii.gz", c) for c in cases}
                  for key, out in last.items() if key.endswith("all cases")
                  and (key.startswith("ctseg") or args.stock_weights)}
    print(f"# cold-process end to end, {args.rounds} round(s), torch threads of each child by default; "
          f"cases: {', '.join(c.name for c in cases)} (one case: {single.name})\n")
    print("| pipeline | median wall s | peak RSS MB | median s per case in the batch |")
    print("|---|---|---|---|")
    for key, value in runs.items():
        per_case = {name: statistics.median(r["per_case"][name] for r in value) for name in value[0]["per_case"]}
        cells = ", ".join(f"{k} {v:.2f}" for k, v in per_case.items())
        print(f"| {key} | {statistics.median(r['wall'] for r in value):.2f} | "
              f"{max(r['rss_mb'] for r in value):.0f} | {cells} |")
    for key, value in scores.items():
        print(f"\nDice, {key}: " + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a"
                                          for k, v in value.items()))
    if not args.stock_weights:
        print("\nstock network untrained (no --stock-weights): its Dice is not reported")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="ctseg run folder, checkpoint or bundle")
    parser.add_argument("--cases", default=str(REPO.parent / "shared/data/lctsc"),
                        help="case folder (seed layout with Segmentations/ for Dice)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", help="case timed alone (default: the first)")
    parser.add_argument("--stock-weights", help="state dict of the stock UNet, for its Dice")
    parser.add_argument("--stock", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--case", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=2, help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.stock:
        stock(parsed)
    elif not parsed.model:
        parser.error("--model is required")
    else:
        main(parsed)
