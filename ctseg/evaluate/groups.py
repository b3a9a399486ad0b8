"""What each evaluated case did in training, so a figure is called held-out only when it is.

A run's `split.json` says which cases it trained on (`train`), which validation cases picked its
checkpoint and drove its schedule (`val`: selection-biased, never held out) and which it never
loaded (`test`). A labelled case the split does not list was never loaded either (`unseen`).
Without a split nothing is known, and `ctseg evaluate` says that its pooled mean may include
training cases rather than letting it pass for a held-out figure.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctseg.errors import CTSegError

#: The group of cases a split does not list.
UNSEEN = "unseen"
#: The only group when no split is given.
UNKNOWN = "all"
#: Groups whose cases influenced nothing in training: the only ones a held-out figure may average.
HELD_OUT_GROUPS = ("test", UNSEEN)
ROLES = {
    "train": "trained on: seen in training, not an estimate for new patients",
    "val": "validation: picked the checkpoint (and may have driven LR and stopping), selection-biased",
    "test": "test: held out, never loaded by training",
    UNSEEN: "not in the run's split: held out, never loaded by training",
    UNKNOWN: "unknown: no split given, these cases may include training cases",
}
POOLED_WARNING = ("groups unknown: no split given (`--run RUN_DIR` or `--split split.json`), so the "
                  "means below pool whatever cases were given, training cases possibly included; "
                  "they are not held-out figures")


def split_path(run_dir: Path | None, split: Path | None) -> Path | None:
    """The split.json to group by: `split`, or RUN_DIR/split.json; both given must agree."""
    if run_dir is None:
        return Path(split) if split is not None else None
    path = Path(run_dir) / "split.json"
    if not path.is_file():
        raise CTSegError(f"{run_dir}: no split.json there; is it a run folder made by `ctseg train`?")
    if split is not None and Path(split).resolve() != path.resolve():
        raise CTSegError(f"--run {run_dir} and --split {split} name different splits; give one of them")
    return path


def load_split_groups(path: Path) -> dict[str, str]:
    """Case name -> group ("train", "val", "test", ...) from a run's split.json.

    Any top-level list of case names counts as a group, so folds or extra groups work too.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CTSegError(f"{path}: cannot read split file ({exc})") from exc
    groups: dict[str, str] = {}
    for group, names in (data.items() if isinstance(data, dict) else ()):
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            for name in names:
                groups.setdefault(name, group)
    if not groups:
        raise CTSegError(f"{path}: no lists of case names found (expected e.g. {{\"train\": [...]}})")
    return groups


def case_group(name: str, groups: dict[str, str]) -> str:
    """The case's group: its split list, `unseen` when the split omits it, `all` without a split."""
    if not groups:
        return UNKNOWN
    return groups.get(name, UNSEEN)


def ordered(names) -> list[str]:
    """Groups in reading order: train, val, test, unseen, then any others, then all."""
    rank = {g: i for i, g in enumerate(("train", "val", "test", UNSEEN))}
    return sorted(set(names), key=lambda g: (g == UNKNOWN, rank.get(g, len(rank)), g))


def role(group: str) -> str:
    return ROLES.get(group, f"{group}: listed in the split; not counted as held out")


def is_held_out(group: str) -> bool | None:
    """True for test/unseen, False for the split's other lists, None when unknown (no split)."""
    return None if group == UNKNOWN else group in HELD_OUT_GROUPS
