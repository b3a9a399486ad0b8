"""One loader for every form a trained model travels in: run folder, checkpoint file, MONAI bundle.

- RUN_DIR (has `checkpoints/`): its `checkpoints/best.pt`;
- CHECKPOINT: a file in the training checkpoint format (written by `ctseg.train.checkpoint`), or
  a packaged model (`ctseg package-model`: the same entries, weights in half precision, read
  back as float32; on CUDA autocast does the rest);
- nothing (`path=None`): the packaged default lung model, `ctseg.pretrained.WEIGHTS` unless
  `default` names another file (`default_model_path`);
- BUNDLE_DIR (has `configs/inference.yaml`): the network described by the bundle's `network_def`
  and the ctseg config it carries (`ctseg_config`), weights from `models/model.pt`.

It also owns what training and inference share about a model: the registry arguments a config
describes (`network_spec`), building them (`build_model`), the checkpoint file names and reading a
checkpoint dict (`load_checkpoint`); training imports these from here (imports go down).

Weights are always read with `torch.load(weights_only=True)`, so a model file cannot run code.
A bundle config is read as plain YAML: its network must be ctseg's registry
(`ctseg.networks.build_network`) with literal arguments. MONAI's parser, which evaluates `$`
expressions and instantiates any `_target_`, is used only with `trust_bundle=True`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctseg.config import read_yaml_file, resolve_config
from ctseg.slices import context_slices
from ctseg.errors import ConfigError, ModelError
from ctseg.infer.volume import output_channels
from ctseg.networks import build_network
from ctseg.pretrained import BUILD_HINT, FORMAT as PRETRAINED_FORMAT, WEIGHTS as PRETRAINED_WEIGHTS
from ctseg.utils import pick_device

log = logging.getLogger(__name__)

REGISTRY_TARGET = "ctseg.networks.build_network"
#: Exported bundles build the network from their own copy of the registry (scripts/networks).
BUNDLE_REGISTRY_TARGET = "scripts.networks.build_network"
BUNDLE_CONFIG = Path("configs") / "inference.yaml"
BUNDLE_WEIGHTS = Path("models") / "model.pt"
_SPEC_KEYS = ("name", "in_channels", "out_channels", "features", "kwargs", "variant")
#: A run's `checkpoints/` files: training writes them, `load_model` reads BEST.
BEST = "best.pt"
LAST = "last.pt"


@dataclass
class LoadedModel:
    """A trained network in eval mode on its device, with the config inference reads."""

    model: torch.nn.Module
    config: dict
    network: dict | None  # registry spec {name, in_channels, out_channels, features, kwargs}
    source: Path
    kind: str  # "run", "checkpoint", "pretrained" or "bundle"
    sha256: str = ""  # of the weights file, so a log names exactly which model segmented


def is_bundle(path: Path) -> bool:
    return (Path(path) / BUNDLE_CONFIG).is_file()


def default_model_path(default: str | Path | None = None) -> Path:
    """The packaged default model (or `default`, e.g. a test's file); refused when it is absent."""
    path = Path(default) if default is not None else PRETRAINED_WEIGHTS
    if not path.is_file():
        raise ModelError(f"{path}: the default model file is missing; {BUILD_HINT}, or give "
                         "--model RUN_DIR|CHECKPOINT|BUNDLE")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path | None, device: str | torch.device | None = None,
               trust_bundle: bool = False, default: str | Path | None = None) -> LoadedModel:
    """Load a run folder, a checkpoint file, a bundle folder or, for `path=None`, the packaged
    default model (see the module docstring)."""
    path = Path(path) if path is not None else default_model_path(default)
    device = pick_device(str(device) if device is not None else None)
    if path.is_dir() and is_bundle(path):
        return _load_bundle(path, device, trust_bundle)
    if path.is_dir() and not (path / "checkpoints").is_dir():
        raise ModelError(f"{path}: neither a run folder (no checkpoints/) nor a MONAI bundle "
                         f"(no {BUNDLE_CONFIG})")
    checkpoint = resolve_checkpoint(path, BEST)
    state = load_checkpoint(checkpoint, map_location="cpu")
    config, spec = state.get("config"), state["network"]
    if not isinstance(config, dict):
        raise ModelError(f"{checkpoint}: the checkpoint holds no config")
    config = resolve_config(config, f"{checkpoint}: config")  # same schema as training: types, ranges
    # Checkpoints saved before run records (run.json) kept the run's folders in their config; a
    # model config carries none, so nothing local reaches a prediction log or an exported bundle.
    config["data"].update(case_dir=None, cache_dir=None)
    check_network(spec, config, checkpoint)
    model = build_model(spec, checkpoint)
    load_weights(model, as_float32(state["model"]), checkpoint)
    kind = ("run" if path.is_dir() else
            "pretrained" if state.get("format") == PRETRAINED_FORMAT else "checkpoint")
    loaded = LoadedModel(model.to(device).eval(), config, spec, checkpoint, kind, file_sha256(checkpoint))
    log.info("model: %s %s (sha256 %s)", kind, checkpoint, loaded.sha256[:12])
    return loaded


def as_float32(state_dict: Any) -> Any:
    """Half-precision weights (a packaged model) as float32: CPU inference runs in float32, and
    CUDA's autocast picks half precision per operation from float32 weights."""
    if not isinstance(state_dict, dict):
        return state_dict
    return {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v
            for k, v in state_dict.items()}


def network_spec(config: dict) -> dict:
    """The registry arguments that rebuild the model described by `config`.

    `variant` is written only when it is not "default": a spec without it means the default, so
    default runs keep the spec of runs made before variants existed (resume compares specs).
    """
    model = resolve_config(config)["model"]  # plain lists and dicts, as saved in checkpoints
    spec = {
        "name": model["name"],
        "in_channels": context_slices(config),
        "out_channels": output_channels(config),
        "features": model["features"],
        "kwargs": model["kwargs"],
    }
    return spec | ({"variant": model["variant"]} if model["variant"] != "default" else {})


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with `weights_only=True`; anything else is refused as a ModelError."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: no such checkpoint") from exc
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ModelError(f"{path}: not a loadable ctseg checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state or "network" not in state:
        raise ModelError(f"{path}: not a ctseg checkpoint (no 'model'/'network' entries)")
    return state


def resolve_checkpoint(path: str | Path, which: str = BEST) -> Path:
    """A run folder means its `checkpoints/<which>`; a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / which
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint")
    return path


def check_network(spec: dict, config: dict, source: Path) -> None:
    """Refuse a network whose channels disagree with the preprocessing and classes of its config."""
    try:
        wanted_in, wanted_out = context_slices(config), output_channels(config)
    except ConfigError as exc:
        raise ModelError(f"{source}: {exc}") from exc
    if int(spec["in_channels"]) != wanted_in:
        raise ModelError(f"{source}: the network takes {spec['in_channels']} input channel(s) but its "
                         f"config stacks {wanted_in} slice(s) per input (data.context)")
    if int(spec["out_channels"]) != wanted_out:
        raise ModelError(f"{source}: the network gives {spec['out_channels']} output channel(s) but its "
                         f"config's data.num_classes needs {wanted_out}")


def build_model(spec: dict, source: Path | None = None) -> torch.nn.Module:
    """An untrained network from registry arguments (`network_spec`).

    With a `source` (a model file), a spec that cannot be built is that file's ModelError; without
    one (training, whose config was already checked) the registry's own error passes through.
    """
    try:
        return build_network(spec["name"], int(spec["in_channels"]), int(spec["out_channels"]),
                             features=spec.get("features"),
                             variant=spec.get("variant", "default"),  # older runs: no key
                             **(spec.get("kwargs") or {}))
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        if source is None:
            raise
        raise ModelError(f"{source}: cannot build network {spec.get('name')!r} ({exc})") from exc


def load_weights(model: torch.nn.Module, state_dict: Any, source: Path) -> None:
    if not isinstance(state_dict, dict):
        raise ModelError(f"{source}: holds no state_dict")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise ModelError(f"{source}: weights do not fit the network ({exc})") from exc


# --------------------------------------------------------------------------- bundles
def read_bundle_config(bundle: Path) -> dict:
    """The bundle's inference config as plain data (nothing evaluated, nothing imported)."""
    path = bundle / BUNDLE_CONFIG
    try:
        config = read_yaml_file(path)  # size, depth and alias expansion capped
    except ConfigError as exc:
        raise ModelError(f"unreadable bundle config: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path}: a bundle config must be a mapping")
    return config


def _load_bundle(bundle: Path, device: torch.device, trust: bool) -> LoadedModel:
    config_path = bundle / BUNDLE_CONFIG
    raw = read_bundle_config(bundle)
    weights = bundle / BUNDLE_WEIGHTS
    if not weights.is_file():
        raise ModelError(f"{weights}: the bundle has no weights; `ctseg export-bundle RUN_DIR --output "
                         f"{bundle}` writes them")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
        raise ModelError(f"{weights}: not loadable with weights_only=True ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a CheckpointLoader-style {"model": state_dict}
    if not isinstance(raw.get("ctseg_config"), dict):
        raise ModelError(f"{config_path}: no `ctseg_config` mapping (the preprocessing the network "
                         "was trained with); export the bundle with `ctseg export-bundle`")
    if trust:
        model, config = _parse_trusted(bundle)
        config = resolve_config(config, f"{config_path}: ctseg_config")
        spec = None
    else:
        _require_literal(raw["ctseg_config"], f"{config_path}: ctseg_config")
        config = resolve_config(raw["ctseg_config"], f"{config_path}: ctseg_config")
        spec = _registry_spec(raw.get("network_def"), config_path)
        check_network(spec, config, config_path)
        model = build_model(spec, config_path)
    load_weights(model, state, weights)
    return LoadedModel(model.to(device).eval(), config, spec, bundle, "bundle", file_sha256(weights))


def _registry_spec(network_def: Any, source: Path) -> dict:
    """`network_def` as registry arguments, accepted only as literal data aimed at ctseg's registry."""
    if not isinstance(network_def, dict):
        raise ModelError(f"{source}: no `network_def` mapping")
    target = network_def.get("_target_")
    if target not in (REGISTRY_TARGET, BUNDLE_REGISTRY_TARGET):
        raise ModelError(f"{source}: network_def#_target_ is {target!r}; without --trust-bundle only "
                         f"{REGISTRY_TARGET!r} is built")
    args = {k: v for k, v in network_def.items() if k != "_target_"}
    _require_literal(args, f"{source}: network_def")
    missing = [k for k in ("name", "in_channels", "out_channels") if k not in args]
    if missing:
        raise ModelError(f"{source}: network_def lacks {missing}")
    spec = {k: args.pop(k) for k in _SPEC_KEYS if k in args}
    spec.setdefault("features", None)
    spec["kwargs"] = {**(spec.get("kwargs") or {}), **args}
    return spec


def _require_literal(value: Any, where: str) -> None:
    """Refuse MONAI config syntax (`$` expressions, `@` references, `%` macros, `_target_`s)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("_target_", "_requires_", "_disabled_", "_mode_"):
                raise ModelError(f"{where}: {key!r} is only accepted with --trust-bundle")
            _require_literal(item, f"{where}#{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _require_literal(item, f"{where}#{i}")
    elif isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ModelError(f"{where}: {value!r} is an expression or reference, evaluated only with "
                         "--trust-bundle")


def _parse_trusted(bundle: Path) -> tuple[torch.nn.Module, dict]:
    """Resolve `network_def` and `ctseg_config` with MONAI's parser (runs the bundle's code)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / BUNDLE_CONFIG))
    metadata = bundle / "configs" / "metadata.json"
    if metadata.is_file():
        parser.read_meta(str(metadata))
    parser["bundle_root"] = str(bundle)
    sys.path.insert(0, str(bundle))  # the bundle's own `scripts` package, as `monai.bundle run` finds it
    try:
        model = parser.get_parsed_content("network_def", instantiate=True)
        config = parser.get_parsed_content("ctseg_config")
    except Exception as exc:  # the bundle's own code may raise anything
        raise ModelError(f"{bundle / BUNDLE_CONFIG}: cannot build network_def ({type(exc).__name__}: {exc})") from exc
    finally:
        sys.path.remove(str(bundle))
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{bundle / BUNDLE_CONFIG}: network_def is not a torch module")
    log.warning("%s: evaluated the bundle's config with MONAI's parser (--trust-bundle)", bundle)
    return model, dict(config)
