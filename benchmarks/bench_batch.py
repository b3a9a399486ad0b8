"""Forward passes only: slices/s of the inference network by slices per pass (`infer.batch_size`).

The network is `--model` (run folder, checkpoint or bundle), else the one `pipelines/lctsc.yaml`
describes with untrained weights (the cost does not depend on the weights). Random input at the
config's `data.size` and context; `torch.inference_mode`, eval mode; per batch size one untimed
warm-up pass, then `--slices` slices per timing, median of `--repeats`. `--channels-last` runs the
same in torch's channels_last memory format (ctseg uses it on CUDA only).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench_infer import _ctseg_model  # the same model choice as the inference benchmark

REPO = Path(__file__).resolve().parents[1]


def _slices_per_second(model: torch.nn.Module, shape: tuple[int, int, int], batch: int, slices: int,
                       repeats: int, channels_last: bool) -> float:
    x = torch.rand(batch, *shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    passes = math.ceil(slices / batch)
    with torch.inference_mode():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(passes):
                model(x)
            times.append(time.perf_counter() - start)
    return passes * batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="run folder, checkpoint or bundle")
    parser.add_argument("--config", type=Path, default=REPO / "pipelines/lctsc.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="input size instead of the config's data.size (the network is the same)")
    args = parser.parse_args()
    loaded = _ctseg_model(args.model, args.config)
    model = loaded.model.eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    height, width = args.size or loaded.config["data"]["size"]
    channels = int(loaded.config["data"].get("context") or 1)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"network: {type(model).__name__}, {params:.2f} M parameters, input {channels}x{height}x{width}"
          f"{', channels_last' if args.channels_last else ''}; {args.slices} slices per timing, median of "
          f"{args.repeats}; {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}, torch {torch.__version__}\n")
    print("| slices per pass | slices/s |")
    print("| --- | --- |")
    for batch in args.batches:
        rate = _slices_per_second(model, (channels, height, width), batch, args.slices, args.repeats,
                                  args.channels_last)
        print(f"| {batch} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
