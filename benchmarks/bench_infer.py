"""End-to-end inference per case: DICOM folder -> mask NIfTI, ctseg against a stock MONAI pipeline.

Pipelines, each timed from the DICOM folder to the written NIfTI:
- `ctseg`: `ctseg.infer.cases.predict_cases` (what `ctseg predict` runs): `ctseg.io.load_series`,
  `predict_volume` (MONAI-free, `ctseg.slices`), post-processing (two largest components,
  fill holes), `save_nifti`. Model: `--model` (run folder, checkpoint or bundle), else the
  network `pipelines/lctsc.yaml` describes with untrained weights (same cost).
- `monai`: MONAI's stock pieces doing the same steps: `LoadImage(reader="PydicomReader")`,
  `ScaleIntensityRange` to the same HU window, `Resize` to the same in-plane size (anti-aliased, as
  ctseg's), `SliceInferer` (same ROI and slices per batch), sigmoid, `Resize` back, `AsDiscrete`,
  `SaveImage` (NIfTI, uint8); network `monai.networks.nets.UNet` sized to about ctseg's parameter
  count (channels f..16f, 2 residual units).
- `monai-1.6M` (with `--reference`): the same with the 1.6M-parameter UNet (16..256 channels).

Each pipeline runs in its own process (peak RSS is that process's `ru_maxrss`: Python, PyTorch,
MONAI, the model and the largest case), pipelines alternate round by round, one untimed warm-up
case per process. Cases: the LCTSC sample when present, else a 150-slice 512x512 phantom.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LCTSC = REPO.parent / "shared/data/lctsc"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ctseg_model(model: str | None, config_path: Path):
    from ctseg.config import load_config, resolve_config
    from ctseg.infer.model_loader import LoadedModel, build_model, load_model, network_spec

    if model:
        return load_model(model, device="cpu")
    config = resolve_config(load_config(config_path))
    spec = network_spec(config)
    return LoadedModel(build_model(spec).eval(), config, spec, config_path,
                       "config")


def _stock_unet(target: int):
    from monai.networks.nets import UNet

    def build(f: int) -> UNet:
        return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(f * 2**i for i in range(5)),
                    strides=(2, 2, 2, 2), num_res_units=2)

    f = min(range(2, 33), key=lambda f: abs(sum(p.numel() for p in build(f).parameters()) - target))
    return build(f)


def child(args: argparse.Namespace) -> None:
    """One pipeline over all cases (plus a warm-up); prints one JSON line."""
    import numpy as np
    import torch

    cases = [Path(c) for c in args.case]
    out = Path(args.out)
    loaded = _ctseg_model(args.model, args.config)
    config = loaded.config
    result: dict = {"pipeline": args.child, "cases": {}, "threads": torch.get_num_threads()}

    if args.child == "ctseg":
        from ctseg.infer.cases import predict_cases

        model = loaded.model
        result["network"] = f"ctseg {loaded.network['name']} {loaded.network.get('features')}"

        def run_case(case: Path) -> tuple[float, int]:
            (r,) = predict_cases(loaded, case, out)
            if not r.ok:
                raise RuntimeError(r.error)
            return r.seconds, r.slices
    else:
        from monai.inferers import SliceInferer
        from monai.transforms import AsDiscrete, Compose, LoadImage, Resize, SaveImage, ScaleIntensityRange

        from ctseg.infer.volume import inference_batch_size
        from ctseg.transforms import hu_window, training_size

        target = sum(p.numel() for p in loaded.model.parameters())
        model = _stock_unet(1_624_844 if args.child == "monai-1.6M" else target).eval()
        channels = model.channels
        result["network"] = f"monai UNet {list(channels)}, 2 res units"
        lo, hi = hu_window(config)
        size = training_size(config)
        load = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
        pre = Compose([ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
                       Resize(spatial_size=(*size, -1), mode="bilinear", anti_aliasing=True)])
        inferer = SliceInferer(roi_size=size, spatial_dim=2,  # same batch as ctseg
                               sw_batch_size=inference_batch_size(config, torch.device("cpu")))
        threshold = AsDiscrete(threshold=float(config["infer"].get("threshold", 0.5)))
        save = SaveImage(output_dir=str(out), output_postfix="", output_ext=".nii.gz", separate_folder=False,
                         resample=False, output_dtype=np.uint8, print_log=False)

        def run_case(case: Path) -> tuple[float, int]:
            start = time.perf_counter()
            image = load(str(case))
            x, y, z = image.shape[1:]
            with torch.inference_mode():
                probs = torch.sigmoid(inferer(pre(image)[None], model))[0]
            back = Resize(spatial_size=(x, y, -1), mode="bilinear")(probs)
            save(threshold(back).to(torch.uint8))
            return time.perf_counter() - start, z

    result["params"] = sum(p.numel() for p in model.parameters())
    result["rss_before_mb"] = _rss_mb()
    run_case(cases[0])  # warm-up: first-call kernel selection and allocations, untimed
    for case in cases:
        seconds, slices = run_case(case)
        result["cases"][case.name] = {"seconds": seconds, "slices": slices}
    result["peak_rss_mb"] = _rss_mb()
    if args.child == "ctseg":
        result["stages"] = _ctseg_stages(loaded, cases[0], out)
    print(json.dumps(result))


def _ctseg_stages(loaded, case: Path, out: Path) -> dict:
    """Seconds of each step of `predict_cases` for one case, for the breakdown line."""
    from ctseg.infer.postprocess import postprocess_labels, postprocess_steps
    from ctseg.infer.volume import num_classes, predict_volume
    from ctseg.io import load_series, save_nifti

    times = {}
    t = time.perf_counter()
    volume = load_series(case)
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    labels, _ = predict_volume(loaded.model, volume.array, loaded.config, "cpu", spacing_yx=volume.spacing[1:])
    times["infer"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = postprocess_labels(labels, postprocess_steps(loaded.config, num_classes(loaded.config)))
    times["postprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    save_nifti(labels, volume.affine, out / "stages.nii.gz")
    times["write"] = time.perf_counter() - t
    return times


def _dice(pred_dir: Path, case_dir: Path) -> dict[str, float]:
    """Volume Dice of ctseg's masks against the truth of the cases (only meaningful for a trained model)."""
    from ctseg.data import discover_cases
    from ctseg.evaluate.metrics import segmentation_metrics
    from ctseg.io import load_mask, load_nifti, load_series

    scores = {}
    for case in discover_cases(case_dir):
        if case.label is None or not (pred_dir / f"{case.name}.nii.gz").is_file():
            continue
        volume = load_series(case.image)
        truth = load_mask(case.label, volume)
        pred = load_nifti(pred_dir / f"{case.name}.nii.gz").array.astype("uint8")
        scores[case.name] = segmentation_metrics(pred, truth, volume.spacing, distances=False)["dice"]
    return scores


def parent(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        tmp = Path(tmp)
        if args.cases:
            case_dir = Path(args.cases)
        elif LCTSC.is_dir():
            case_dir = LCTSC
        else:
            from ctseg.data.phantom import write_phantom_dataset

            case_dir = write_phantom_dataset(tmp / "phantom", n_cases=1, rows=512, cols=512, slices=150)
        from ctseg.data import discover_cases

        cases = [str(c.image) for c in discover_cases(case_dir)]
        pipelines = ["ctseg", "monai"] + (["monai-1.6M"] if args.reference else [])
        runs: dict[str, list[dict]] = {p: [] for p in pipelines}
        for round_ in range(args.rounds):
            for pipeline in pipelines:
                out = tmp / f"{pipeline}-{round_}"
                command = [sys.executable, __file__, "--child", pipeline, "--out", str(out),
                           "--config", str(args.config), *sum((["--case", c] for c in cases), [])]
                if args.model:
                    command += ["--model", str(args.model)]
                proc = subprocess.run(command, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{pipeline} failed:\n{proc.stderr[-4000:]}")
                runs[pipeline].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        dice = _dice(tmp / "ctseg-0", case_dir) if args.model else {}
        _report(runs, case_dir, args, dice)


def _report(runs: dict[str, list[dict]], case_dir: Path, args: argparse.Namespace, dice: dict) -> None:
    first = runs["ctseg"][0]
    print(f"cases: {case_dir} ({len(first['cases'])}); model: {args.model or f'{args.config} (untrained weights)'}; "
          f"{args.rounds} alternating round(s), 1 warm-up case per process; {os.cpu_count()} CPUs, "
          f"torch threads {first['threads']}, load average {os.getloadavg()[0]:.1f}; "
          f"Python {platform.python_version()}\n")
    print("| pipeline | network | params | case | slices | s (median) | slices/s | peak RSS MB "
          "(before the first case) |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    means = {}
    for pipeline, rounds in runs.items():
        info = rounds[0]
        peak = max(r["peak_rss_mb"] for r in rounds)
        before = max(r["rss_before_mb"] for r in rounds)
        per_case = []
        for case in info["cases"]:
            seconds = statistics.median(r["cases"][case]["seconds"] for r in rounds)
            slices = info["cases"][case]["slices"]
            per_case.append((seconds, slices))
            print(f"| {pipeline} | {info['network']} | {info['params'] / 1e6:.2f} M | {case} | {slices} | "
                  f"{seconds:.2f} | {slices / seconds:.1f} | {peak:.0f} |")
        total_s, total_slices = sum(s for s, _ in per_case), sum(n for _, n in per_case)
        means[pipeline] = total_s / len(per_case)
        print(f"| **{pipeline}** | | | mean | {total_slices / len(per_case):.0f} | **{means[pipeline]:.2f}** | "
              f"**{total_slices / total_s:.1f}** | {peak:.0f} ({before:.0f}) |")
    stages = statistics.median(sum(r["stages"].values()) for r in runs["ctseg"])
    breakdown = {k: statistics.median(r["stages"][k] for r in runs["ctseg"]) for k in first["stages"]}
    print(f"\nctseg per step ({next(iter(first['cases']))}, median of rounds): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in breakdown.items()) + f" (sum {stages:.2f} s)")
    for pipeline in runs:
        if pipeline != "ctseg":
            print(f"speed-up of ctseg over {pipeline} (mean seconds per case): "
                  f"**{means[pipeline] / means['ctseg']:.2f}x**")
    if dice:
        print("ctseg volume Dice against the truth: "
              + ", ".join(f"{k} {v:.4f}" for k, v in dice.items())
              + f" (mean {statistics.mean(dice.values()):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="run folder, checkpoint or bundle (default: untrained "
                        "network of --config)")
    parser.add_argument("--config", type=Path, default=REPO / "pipelines/lctsc.yaml")
    parser.add_argument("--cases", default=None, help=f"case folder (default {LCTSC} if present, else a phantom)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also run the 1.6M-parameter stock UNet")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
