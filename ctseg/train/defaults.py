"""Defaults of every training setting, merged under the user's config before a run starts.

The merged ("resolved") config is what the run saves, what MLflow records and what inference
reads, so a run folder states every value it used, including the ones nobody typed.
"""

from __future__ import annotations

import copy

from ctseg.errors import ConfigError

DEFAULTS: dict = {
    "data": {
        "case_dir": None,           # None: the built-in phantom (section `phantom`)
        "window": [-1000, 400],     # HU window mapped to [0, 1]
        "size": [256, 256],         # in-plane training size (H, W)
        "context": 1,               # 2.5D: odd number of neighbouring slices as channels
        "num_classes": 2,           # incl. background; 2 = binary (sigmoid), more = softmax
        "foreground_ratio": None,   # share of sampled slices with foreground; None = natural
        "cache_dir": None,          # None: $CTSEG_CACHE_DIR or ./.cache
    },
    "phantom": {"cases": 6, "seed": 0, "rows": 256, "cols": 256, "slices": 48},
    "split": {"seed": 0, "val_fraction": 0.2, "test_fraction": 0.0},
    "model": {"name": "unet", "features": None, "kwargs": {}, "variant": "default"},  # or thesis
    "loss": {"lambda_dice": 1.0, "lambda_ce": 1.0, "batch": True, "include_background": True},
    "optim": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0,
              "plateau_factor": 0.5, "plateau_patience": 5, "min_lr": 1.0e-6},
    "train": {
        "seed": 0,
        "epochs": 50,
        "batch_size": 16,
        "slices_per_epoch": None,   # None: as many as there are training slices
        "early_stopping": 10,       # epochs without a better val Dice; None = off
        "selection": "best",        # best: val Dice picks the checkpoint, drives the plateau LR and
                                    # early stopping; last: fixed length, the last epoch is kept and
                                    # validation (optional) only monitors (e.g. `ctseg cv` folds)
        "time_limit_minutes": None, # stop after the epoch that crosses it
        "clip_grad_norm": 1.0,      # None = off
        "amp": True,                # CUDA only
        "channels_last": True,      # CUDA only
        "num_workers": 0,
        "sync_bn": False,           # torchrun on GPUs: BatchNorm statistics over all ranks
    },
    "augment": {},
    "infer": {"batch_size": "auto",  # slices per forward pass; auto: 4 on CPU, 32 on CUDA
              "threshold": 0.5, "tta": []},
    "tracking": {"enabled": True, "uri": None, "experiment": "ctseg"},
}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(config: dict) -> dict:
    """`config` with every missing setting filled from DEFAULTS (the user's values win)."""
    for section in DEFAULTS:
        if section in config and config[section] is not None and not isinstance(config[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {config[section]!r}")
    return _merge(DEFAULTS, {k: v for k, v in config.items() if v is not None})
