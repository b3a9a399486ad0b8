"""The registry: the study's model versions by name, built from plain arguments.

`build_network(name, in_channels, out_channels, features=None, variant="default", **kwargs)`
takes only plain values, so the same call works from a YAML config, from a checkpoint's
`network` entry and as a MONAI bundle `network_def`:

    network_def:
      _target_: ctseg.networks.build_network
      name: unet_mcnet
      in_channels: 1
      out_channels: 1
      features: [64, 128, 256, 512]
      variant: default

Two variants of each version: `default`, ctseg's engineered blocks, and `thesis`, the blocks as
the study built them, which reproduce its parameter counts (docs/networks.md, "thesis vs
default", says what differs and why). Training and inference code builds every model through
here and never imports a concrete class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from ctseg.errors import ConfigError
from ctseg.networks.unet import DEFAULT_FEATURES, UNet


VARIANTS = ("default", "thesis")


@dataclass(frozen=True)
class Build:
    """One variant of a network: the UNet arguments it fixes and the options a config may set."""

    fixed: dict[str, Any] = field(default_factory=dict)     # UNet arguments the variant sets
    options: dict[str, type] = field(default_factory=dict)  # user kwargs and their types


@dataclass(frozen=True)
class RegistryEntry:
    """One registry name: its study version, description and how each variant builds it (the
    arguments that rebuild a trained model are `ctseg.infer.model_loader.network_spec`)."""

    study_version: str
    description: str
    default: Build
    thesis: Build


NETWORKS: dict[str, RegistryEntry] = {
    "unet": RegistryEntry("ver1/ver2", "U-Net with DoubleConv stages", Build(), Build()),
    "unet_spconv": RegistryEntry(
        "ver3", "U-Net whose 3x3 convs are SPConv",
        Build({"conv": "spconv"}, {"alpha": float}),
        Build({"conv": "spconv", "lift": True}, {"alpha": float})),
    "unet_ra": RegistryEntry(
        "ver4", "U-Net with residual-attention skips",
        Build({"attention": "learned"}, {"attention_ratio": float}),
        Build({"attention": "parameter_free"})),
    "unet_mcnet": RegistryEntry(
        "ver5", "ConvModule (CIE, DoubleConv, MFE) stages + RA skips",
        Build({"encoder_block": "conv_module", "bottleneck_block": "conv_module",
               "attention": "learned"}, {"attention_ratio": float}),
        Build({"encoder_block": "conv_module_thesis", "decoder_block": "conv_module_thesis",
               "attention": "parameter_free"})),
}


def list_networks() -> list[str]:
    """Registered names, in the study's version order."""
    return list(NETWORKS)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}") from None
    if not number.is_integer() or number < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return int(number)


def _features(features: Sequence[int] | None, name: str) -> tuple[int, ...]:
    if features is None:
        return DEFAULT_FEATURES
    if isinstance(features, (str, bytes)) or not isinstance(features, Sequence) or not features:
        raise ConfigError(f"{name}: features must be a non-empty list of widths, got {features!r}")
    return tuple(_positive_int(f, f"{name}: features[{i}]") for i, f in enumerate(features))


def build_network(name: str, in_channels: int, out_channels: int,
                  features: Sequence[int] | None = None, variant: str = "default",
                  **kwargs: Any) -> nn.Module:
    """Build network `name`: (B, in_channels, H, W) -> (B, out_channels, H, W) logits.

    `features` are the encoder widths (default 64, 128, 256, 512); `variant` is "default" or
    "thesis"; `kwargs` are the name's options (`alpha` for unet_spconv, `attention_ratio` for the
    default unet_ra / unet_mcnet). Anything unknown or inconsistent raises ConfigError naming the
    network and the problem.
    """
    spec = NETWORKS.get(name)
    if spec is None:
        raise ConfigError(f"unknown network {name!r}; available: {', '.join(NETWORKS)}")
    if variant not in VARIANTS:
        raise ConfigError(f"{name}: unknown variant {variant!r} (available: {', '.join(VARIANTS)})")
    build: Build = getattr(spec, variant)
    unknown = sorted(set(kwargs) - set(build.options))
    if unknown:
        accepted = ", ".join(build.options) or "none"
        raise ConfigError(f"{name} ({variant}): unknown option(s) {', '.join(unknown)} "
                          f"(accepted: {accepted})")
    options = {}
    for key, value in kwargs.items():
        try:
            options[key] = build.options[key](value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: option {key} must be a number, got {value!r}") from None
    try:
        return UNet(_positive_int(in_channels, f"{name}: in_channels"),
                    _positive_int(out_channels, f"{name}: out_channels"),
                    _features(features, name), **build.fixed, **options)
    except ConfigError as exc:
        if str(exc).startswith(f"{name}:"):
            raise
        raise ConfigError(f"{name}: {exc}") from None
