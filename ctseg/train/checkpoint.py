"""Saving checkpoints and RNG state: one self-describing file per state, written atomically.

Reading a checkpoint, its file names and rebuilding its network live in `ctseg.infer.model_loader`
(inference needs them and sits below training).

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

from ctseg.utils import atomic_torch_save


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_torch_save(state, path)


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
