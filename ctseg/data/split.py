"""Patient-level train/validation/test splits, written to `split.json` with every run.

Splitting by case (never by slice) is what keeps neighbouring, near-identical slices of one
patient from sitting on both sides of the split and inflating the validation Dice. The split is a
pure function of the sorted case names and the config, so a run can be reproduced from its config.

Config section `split`:
    seed: 0              # shuffles the sorted case names
    val_fraction: 0.2    # at least one case when > 0
    test_fraction: 0.0
    folds: null          # k-fold: the non-test cases in `folds` folds ...
    fold: 0              # ... and this fold is the validation set
    train/val/test: [..] # explicit case lists instead of fractions (train defaults to the rest)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from ctseg.errors import ConfigError
from ctseg.utils import atomic_write_text

SUBSETS = ("train", "val", "test")


def make_split(case_names: Iterable[str], split_config: dict | None = None) -> dict:
    """Assign every case to exactly one of train / val / test; returns the split.json dict."""
    cfg = dict(split_config or {})
    names = sorted(set(case_names))
    if not names:
        raise ConfigError("split: there are no cases to split")
    seed = int(cfg.get("seed", 0))
    explicit = {k: list(cfg[k]) for k in SUBSETS if cfg.get(k)}
    if explicit:
        split = _explicit_split(names, explicit)
        method = "explicit"
    elif cfg.get("folds"):
        split = _kfold_split(names, seed, int(cfg["folds"]), int(cfg.get("fold", 0)),
                             float(cfg.get("test_fraction", 0.0)))
        method = "kfold"
    else:
        split = _fraction_split(names, seed, float(cfg.get("val_fraction", 0.2)),
                                float(cfg.get("test_fraction", 0.0)))
        method = "fractions"
    split = {k: sorted(split[k]) for k in SUBSETS}
    check_split(split, names)
    result = {**split, "method": method, "seed": seed}
    if method == "kfold":
        result.update(folds=int(cfg["folds"]), fold=int(cfg.get("fold", 0)))
    return result


def check_split(split: dict, names: Iterable[str] | None = None) -> None:
    """Refuse a split in which a case sits in two subsets (or a listed case does not exist).

    A real check rather than `assert`, so it also runs under `python -O`.
    """
    seen: dict[str, str] = {}
    for subset in SUBSETS:
        for case in split.get(subset, []):
            if case in seen:
                raise ConfigError(f"split: case {case!r} is in both {seen[case]!r} and {subset!r}")
            seen[case] = subset
    if names is not None:
        unknown = sorted(set(seen) - set(names))
        if unknown:
            raise ConfigError(f"split: unknown case(s) {unknown}; the case folder has {sorted(names)}")
    if not split.get("train"):
        raise ConfigError("split: no case is left for training")


def save_split(split: dict, path: str | Path) -> None:
    atomic_write_text(Path(path), json.dumps(split, indent=2) + "\n")


def load_split(path: str | Path) -> dict:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read split ({exc})") from exc
    check_split(split)
    return split


def _shuffled(names: list[str], seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(names))
    return [names[i] for i in order]


def _count(n: int, fraction: float, what: str) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"split: {what} must be in [0, 1), got {fraction}")
    return 0 if fraction == 0 else max(1, int(round(n * fraction)))


def _fraction_split(names: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict:
    order = _shuffled(names, seed)
    n_test = _count(len(names), test_fraction, "split.test_fraction")
    n_val = _count(len(names), val_fraction, "split.val_fraction")
    if n_test + n_val >= len(names):
        raise ConfigError(f"split: {len(names)} case(s) cannot give {n_val} validation and "
                          f"{n_test} test case(s) and still leave one for training")
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}


def _kfold_split(names: list[str], seed: int, folds: int, fold: int, test_fraction: float) -> dict:
    order = _shuffled(names, seed)
    n_test = _count(len(names), test_fraction, "split.test_fraction")
    test, rest = order[:n_test], order[n_test:]
    if folds < 2 or folds > len(rest):
        raise ConfigError(f"split.folds must be between 2 and {len(rest)} (the non-test cases), got {folds}")
    if not 0 <= fold < folds:
        raise ConfigError(f"split.fold must be in [0, {folds}), got {fold}")
    parts = np.array_split(np.arange(len(rest)), folds)
    val = [rest[i] for i in parts[fold]]
    train = [rest[i] for k, part in enumerate(parts) if k != fold for i in part]
    return {"train": train, "val": val, "test": test}


def _explicit_split(names: list[str], explicit: dict[str, list]) -> dict:
    lists = {k: [str(c) for c in explicit.get(k, [])] for k in SUBSETS}
    for subset, cases in lists.items():
        missing = sorted(set(cases) - set(names))
        if missing:
            raise ConfigError(f"split.{subset}: unknown case(s) {missing}; the case folder has {names}")
    if "train" not in explicit:
        taken = set(lists["val"]) | set(lists["test"])
        lists["train"] = [n for n in names if n not in taken]
    return lists
