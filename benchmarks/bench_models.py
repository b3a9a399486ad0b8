"""The study's Table 2 for both variants: size, activation memory and CPU time of ver1-ver5.

Per network and variant (`default`, `thesis`), on one (1, in_channels, size, size) slice, by
default the study's setting (3 input channels, features 64..512) at 256x256:

* `layers`, `params`: as `ctseg models` counts them; `param MB`: float32 storage, MB = 2**20 B;
* `fwd MB`: the *measured* peak of tensor memory other than the parameters, buffers and input
  during one training-mode forward pass (autograd keeps what backward needs). Measured with
  torch's MemTracker (`torch.distributed._tools.mem_tracker`, a TorchDispatchMode that follows
  every storage from allocation to release; a private torch module, so a torch upgrade may move
  it); sizes are rounded up to 512 B blocks as the CUDA allocator would;
* `fwd+bwd MB`: the same peak over forward and backward: activations, their gradients,
  temporaries and the parameter gradients as backward produces them;
* `summary MB`: the torchsummary-style estimate the study's kind of table is made with, 2 x the
  bytes of every leaf module's output in one forward (`ctseg.networks.report.activation_bytes`,
  the `activation_mb` of `ctseg models`): it leaves out functional ops and assumes all outputs
  alive at once;
* `ms/slice`: median wall time of `--repeats` eval-mode forward passes under
  `torch.inference_mode`, batch 1, after one warm-up pass, with torch's thread count printed.
  On a shared, loaded machine these times are indicative only; the header prints the load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from ctseg.networks import build_network, list_networks
from ctseg.networks.registry import NETWORKS, VARIANTS
from ctseg.networks.report import MB, activation_bytes, count_layers


def peak_mb(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Measured peak MB (forward, forward+backward) of tensors other than parameters, buffers
    and the input, for one training-mode pass of `x`."""
    model.train()
    tracker = MemTracker()
    tracker.track_external(model, x)

    def used(snapshot: dict) -> int:
        device = snapshot[x.device]
        fixed = sum(v for k, v in device.items() if str(k) in ("Parameter", "Buffer", "Other"))
        return device["Total"] - fixed

    with tracker:
        out = model(x)
        forward = used(tracker.get_tracker_snapshot("peak"))
        out.float().square().mean().backward()
        both = used(tracker.get_tracker_snapshot("peak"))
    model.zero_grad(set_to_none=True)
    return forward / MB, both / MB


def ms_per_slice(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    model.eval()
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def row(name: str, variant: str, x: torch.Tensor, features: list[int], repeats: int) -> dict:
    torch.manual_seed(0)
    model = build_network(name, x.shape[1], 1, features=features, variant=variant)
    params = sum(p.numel() for p in model.parameters())
    forward, both = peak_mb(model, x)
    model.eval()
    small = torch.zeros(1, x.shape[1], model.min_size, model.min_size)
    return {"name": name, "variant": variant, "version": NETWORKS[name].study_version,
            "layers": count_layers(model, small), "params": params,
            "param_mb": params * 4 / MB, "fwd_mb": forward, "fwd_bwd_mb": both,
            "summary_mb": 2 * activation_bytes(model, x) / MB,
            "ms": ms_per_slice(model, x, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="square slice size")
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--features", default="64,128,256,512")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--names", default=",".join(list_networks()))
    args = parser.parse_args()
    features = [int(f) for f in args.features.split(",")]
    x = torch.randn(1, args.in_channels, args.size, args.size)
    print(f"input 1x{args.in_channels}x{args.size}x{args.size}, features {args.features}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("\n| variant | name | version | layers | params | param MB | fwd MB | fwd+bwd MB "
          "| summary MB | ms/slice |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant in args.variants.split(","):
        for name in args.names.split(","):
            r = row(name, variant, x, features, args.repeats)
            print(f"| {r['variant']} | {r['name']} | {r['version']} | {r['layers']} "
                  f"| {r['params']:,} | {r['param_mb']:.2f} | {r['fwd_mb']:.1f} "
                  f"| {r['fwd_bwd_mb']:.1f} | {r['summary_mb']:.1f} | {r['ms']:.0f} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.1f} (ms/slice: CPU wall time on this "
          "machine; on a shared, loaded machine indicative only)")


if __name__ == "__main__":
    main()
