"""The model report behind `ctseg models`: size, memory and CPU speed of each registered network.

Per network, on one (1, in_channels, size, size) slice:

* `layers`: the layer count of the study's Table 2, defined here as the number of calls, in one
  forward pass, of modules that are neither containers (nn.Sequential, nn.ModuleList,
  nn.ModuleDict) nor the network itself, and whose output is a new tensor (a pass-through such as
  nn.Identity or the plain skip is no layer). These are the rows torchsummary prints, less the
  pass-throughs; functional ops (torch.cat, F.relu, the thesis RA's arithmetic) are not layers.
  Of the definitions tried, it is the one that gives the study's 72 / 199 / 72 / 200 for the
  thesis ver1, ver3, ver4, ver5 (tested);
* `params`, `trainable_params`: parameter counts; `param_mb`: their storage (float32 -> 4 bytes
  each). MB here is 2**20 bytes, as in torchsummary, the usual source of such tables.
* `activation_mb`: an *estimate* of forward + backward activation memory for a batch of one, in
  torchsummary's convention: the bytes of every leaf module's output in one forward pass, times
  two (each saved activation gets a gradient of the same size in backward). It leaves out
  parameter-free functional ops (concatenations, paddings, the residual adds, SPConv's
  re-weighting), framework workspaces and the optimizer state, and it assumes every activation
  is alive at once: read it as a comparison between networks, not a peak to plan a GPU by. It
  scales with the batch.
* `cpu_ms_per_slice`: median wall time of `repeats` forward passes in eval mode under
  `torch.inference_mode` on the CPU, after the activation pass has warmed it up, with torch's
  current thread count (reported as `threads`). Few repeats keep `ctseg models` at 512x512 near a
  minute on two cores; on a busy machine the figure is only as good as the machine is quiet.

Nothing here prints; the CLI formats the rows.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterator, Sequence

import torch
from torch import nn

from ctseg.errors import ConfigError
from ctseg.networks.registry import build_network, list_networks

MB = 2**20
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs in one forward pass of `x` (forward activations only).

    An output that is one of the module's inputs (nn.Identity, a pass-through skip) is no new
    memory and is not counted.
    """
    total = 0

    def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(t.numel() * t.element_size() for t in outputs
                     if isinstance(t, torch.Tensor) and not any(t is i for i in inputs))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    _forward_with_hook(model, x, hook, leaves)
    return total


def count_layers(model: nn.Module, x: torch.Tensor) -> int:
    """Calls of non-container modules whose output is a new tensor, in one forward pass of `x`."""
    count = 0

    def hook(_module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal count
        if not any(output is i for i in inputs):
            count += 1

    _forward_with_hook(model, x, hook, [m for m in model.modules()
                                        if m is not model and not isinstance(m, CONTAINERS)])
    return count


def _forward_with_hook(model: nn.Module, x: torch.Tensor, hook, modules: list[nn.Module]) -> None:
    """One inference forward pass of `x` with `hook` on `modules` (removed afterwards)."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()


def cpu_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int = 2) -> float:
    """Median milliseconds of `repeats` forward passes of `x` (warm the model up before)."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def network_report(names: Sequence[str] | None = None, in_channels: int = 1,
                   out_channels: int = 1, features: Sequence[int] | None = None,
                   size: int = 512, repeats: int = 2, variant: str = "default") -> list[dict]:
    """One row per network (default: all) of `variant`, measured on a (1, in_channels, size, size)
    slice; layers are counted on the smallest slice the network takes."""
    return list(iter_network_report(names, in_channels, out_channels, features, size, repeats, variant))


def iter_network_report(names: Sequence[str] | None = None, in_channels: int = 1,
                        out_channels: int = 1, features: Sequence[int] | None = None,
                        size: int = 512, repeats: int = 2,
                        variant: str = "default") -> Iterator[dict]:
    """`network_report`'s rows as each is measured, so a caller can show them at once (a 512x512
    report takes minutes on a CPU)."""
    if size < 1 or repeats < 1:
        raise ConfigError(f"size ({size}) and repeats ({repeats}) must be >= 1")
    x = torch.randn(1, in_channels, size, size)
    for name in names or list_networks():
        model = build_network(name, in_channels, out_channels, features=features,
                              variant=variant).eval()
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        yield {
            "name": name,
            "variant": variant,
            "layers": count_layers(model, torch.zeros(1, in_channels, model.min_size,
                                                      model.min_size)),
            "params": params,
            "trainable_params": trainable,
            "param_mb": round(param_bytes / MB, 2),
            "activation_mb": round(2 * activation_bytes(model, x) / MB, 2),
            "cpu_ms_per_slice": round(cpu_latency_ms(model, x, repeats), 1),
            "input_shape": list(x.shape),
            "threads": torch.get_num_threads(),
        }
