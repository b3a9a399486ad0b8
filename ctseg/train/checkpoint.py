"""Checkpoints: one self-describing file per state, written atomically, loaded without pickle code.

A checkpoint is a plain dict of tensors and builtins, so `torch.load(weights_only=True)` can read
it (no arbitrary code runs from an untrusted file):
    model       state_dict
    optimizer   state_dict          scheduler   state_dict
    epoch       last completed epoch (1-based)
    config      the resolved config (preprocessing is read from it at inference)
    split       the patient-level split (restored on resume, never recomputed)
    rng         torch / numpy / python RNG states
    network     {name, in_channels, out_channels, features, kwargs}: enough to rebuild the
                model through the registry without the config
plus `best_val_dice`, `best_epoch`, `history` and `elapsed_seconds` so a resumed run continues
its early stopping and metrics where they stopped.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ctseg.config import resolve_config
from ctseg.data.dataset import context_slices
from ctseg.errors import ModelError
from ctseg.transforms import output_channels
from ctseg.utils import atomic_torch_save

BEST = "best.pt"
LAST = "last.pt"


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


def build_model(spec: dict) -> torch.nn.Module:
    from ctseg.networks import build_network

    return build_network(spec["name"], spec["in_channels"], spec["out_channels"],
                         features=spec.get("features"), variant=spec.get("variant", "default"),
                         **(spec.get("kwargs") or {}))


def build_model_from_config(config: dict) -> torch.nn.Module:
    """Build (untrained) the network `config` names, through the registry."""
    return build_model(network_spec(config))


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_torch_save(state, path)


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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """A trained model in eval mode and its config, from a run folder (best.pt) or a checkpoint."""
    state = load_checkpoint(resolve_checkpoint(path), map_location=device)
    model = build_model(state["network"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit network {state['network']['name']!r} ({exc})") from exc
    return model.to(device).eval(), state["config"]


def rng_state() -> dict:
    """Every global RNG, as tensors and builtins (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
