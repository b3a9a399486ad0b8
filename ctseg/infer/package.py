"""`ctseg package-model RUN`: a trained run as the package's default lung model and its card.

Why: `ctseg predict` without --model should segment lungs right away, as lungmask and
TotalSegmentator do, from a file small enough to ship inside the package. The file holds what
`load_model` needs (the training checkpoint's `network` and `config` entries, the config without
local paths) and the run's kept weights (`checkpoints/best.pt`: the last epoch under
`train.selection: last`) in half precision; a file over `ctseg.pretrained.MAX_BYTES` is refused.
Half precision moves the probabilities by far less than 0.02 and flips only voxels at the threshold
(tests/test_pretrained.py bounds both against the float32 run on the phantom).

`MODEL_CARD.md` is generated beside it, every figure read from a file: the data (the case folder's
README: source, licence, citation), the recipe (the run's resolved config), the training run
(metrics.json, split.json), the cross-validation figures of a `ctseg cv` folder (summary.json,
cv.csv, as `ctseg export-bundle --cv` reports them) and the model's limits.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ctseg.config import flatten, get, read_yaml_file, resolve_config
from ctseg.errors import ConfigError, CTSegError, ModelError
from ctseg.infer.export import cv_lines, read_cv_summary
from ctseg.infer.model_loader import BEST, load_checkpoint, load_model, resolve_checkpoint
from ctseg.pretrained import CARD_NAME, FOLDER, FORMAT, MAX_BYTES, WEIGHTS
from ctseg.utils import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

#: Config entries that describe one machine, not the model.
LOCAL_KEYS = (("data", "case_dir"), ("data", "cache_dir"))
#: Paragraphs of a data README quoted in the card (where the data came from, its licence).
DATA_NOTE_STARTS = ("source", "citation", "licen", "attribution")


def package_model(run_dir: str | Path, output: str | Path | None = None, *, cv_dir: str | Path | None = None,
                  data_note: str | Path | None = None, case_dir: str | Path | None = None,
                  command: str | None = None, max_bytes: int = MAX_BYTES) -> Path:
    """Write OUTPUT (default: the package's `ctseg/pretrained/`) lungs.pt (half precision) and OUTPUT/MODEL_CARD.md from `run_dir`'s kept
    checkpoint; returns the weights file. Nothing is written when the file would exceed
    `max_bytes` or the CV folder or data note cannot be read. Without `data_note`, the README.md
    of `case_dir` (the folder the run trained on, from its run record) is quoted when there is one."""
    run_dir, output = Path(run_dir), Path(output) if output is not None else FOLDER
    checkpoint = resolve_checkpoint(run_dir, BEST)
    loaded = load_model(run_dir, device="cpu")  # refuses what inference could not load
    state = load_checkpoint(checkpoint)
    cv = read_cv_summary(Path(cv_dir)) if cv_dir is not None else None
    cv_rows = _read_cv_rows(Path(cv_dir) / "cv.csv") if cv_dir is not None else []
    cv_differs = recipe_differences(loaded.config, _cv_config(Path(cv_dir))) if cv_dir is not None else []
    note_path = Path(data_note) if data_note is not None else _default_data_note(case_dir)
    note = data_note_text(note_path) if note_path is not None else None
    metrics = _read_json(run_dir / "metrics.json") if run_dir.is_dir() else None
    split = _read_json(run_dir / "split.json") if run_dir.is_dir() else None

    payload = {
        "format": FORMAT,
        "name": WEIGHTS.stem,
        "network": copy.deepcopy(state["network"]),
        "config": portable_config(loaded.config),
        "model": half_state_dict(loaded.model.state_dict(), checkpoint),
        "source": {"run": run_dir.resolve().name, "checkpoint": checkpoint.name,
                   "epoch": state.get("epoch"), "selection": (metrics or {}).get("selection")},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if len(data) > max_bytes:
        raise ModelError(f"{checkpoint}: the packaged model would take {len(data):,} bytes, over the "
                         f"{max_bytes:,} a packaged model may take; train a narrower network "
                         "(model.features)")
    weights = output / WEIGHTS.name
    with atomic_path(weights) as tmp:
        tmp.write_bytes(data)
    reloaded = load_model(weights, device="cpu")  # the file as users will load it
    card = model_card(reloaded, payload["source"], metrics=metrics, split=split, cv=cv, cv_rows=cv_rows,
                      cv_differs=cv_differs, note=note, command=command, size=len(data))
    atomic_write_text(output / CARD_NAME, card)
    log.info("packaged %s as %s (%d bytes, sha256 %s)", checkpoint, weights, len(data), reloaded.sha256[:12])
    return weights


def portable_config(config: dict) -> dict:
    """The config without what only held on the training machine (case and cache folders, tracking)."""
    config = copy.deepcopy(config)
    for section, key in LOCAL_KEYS:
        (config.get(section) or {}).pop(key, None)
    config.pop("tracking", None)
    return config


def half_state_dict(state_dict: dict, source: Path) -> dict:
    """Floating-point tensors as float16 (integer buffers kept); refused if a value overflows."""
    half = {}
    for name, tensor in state_dict.items():
        if tensor.is_floating_point():
            tensor = tensor.detach().to("cpu", torch.float16)
            if not torch.isfinite(tensor).all():
                raise ModelError(f"{source}: {name} does not fit half precision (values beyond ±65504)")
        half[name] = tensor.clone()
    return half


# --------------------------------------------------------------------------- the card
def model_card(loaded, source: dict, *, metrics: dict | None, split: dict | None, cv: dict | None,
               cv_rows: list[dict], cv_differs: list[str], note: str | None, command: str | None,
               size: int) -> str:
    """MODEL_CARD.md: data, recipe, training, cross-validation figures and limits, from files."""
    config, spec = loaded.config, loaded.network
    params = sum(p.numel() for p in loaded.model.parameters())
    train_cases = list((split or {}).get("train") or [])
    lines = [f"# ctseg default lung model (`{loaded.source.name}`)", "",
             f"Generated by `ctseg package-model` from run `{source['run']}` ({source['checkpoint']}, "
             f"epoch {source['epoch']}, selection `{source['selection']}`); `make pretrained` rebuilds "
             "it. Do not edit by hand.", "",
             f"- file: `{loaded.source.name}`, {size:,} bytes, sha256 `{loaded.sha256}`; weights in half "
             "precision, read back as float32",
             f"- network: `{spec['name']}`, features {spec.get('features')}, {params:,} parameters, "
             f"{spec['in_channels']} input channel(s), {spec['out_channels']} output channel(s)",
             "- use: `ctseg predict -i CT_FOLDER -o OUT` (no `--model`), or "
             "`ctseg.infer.Segmenter.load()` in Python", "",
             "## Data", ""]
    lines += ([f"> {line}" if line else ">" for line in note.splitlines()] if note else
              ["No data note was given (`--data-note`), and the training case folder has no README.md."])
    lines += ["", f"Trained on {len(train_cases)} case(s): {', '.join(train_cases) or 'n/a'}"
              f"; validation cases: {', '.join((split or {}).get('val') or []) or 'none'}"
              f"; test cases: {', '.join((split or {}).get('test') or []) or 'none'}.", "",
              "## Recipe", "", recipe_summary(config), "",
              "The resolved config (local paths and tracking left out), as inference also reads it:", "",
              "```yaml", yaml.safe_dump(_recipe_sections(config), sort_keys=False, width=100).rstrip(), "```",
              "", "## Training", ""]
    lines.append(f"Command: `{command}`" if command else
                 "Command: `ctseg train` with the config above (the run did not record its command line).")
    if metrics:
        lines.append("")
        lines.append(f"Run: {metrics.get('epochs')} epochs in {_num(metrics.get('train_seconds'), '.0f')} s on "
                     f"`{metrics.get('device')}`, {_num(metrics.get('slices_per_second'), '.1f')} training "
                     f"slices/s, schedule `{metrics.get('schedule')}`, EMA {metrics.get('ema')} "
                     "(from the run's metrics.json).")
    lines += ["", "## Cross-validation", ""]
    if cv is None:
        lines.append("No cross-validation figures: packaged without `--cv`.")
    else:
        lines += cv_lines(cv)[3:]  # without its own heading
        lines += cv_table(cv_rows)
        cv_cases = sorted(r.get("case", "") for r in cv_rows)
        lines += ["", "These figures describe the recipe, not this file: each fold trained it on the other "
                  "cases; " + ("this model is the same recipe trained on all of them."
                               if cv_cases == sorted(train_cases) and not cv_differs else
                               "**this model differs** from what was cross-validated in "
                               + " and in ".join(
                                   ([f"its training cases ({', '.join(train_cases) or 'unknown'} vs "
                                     f"{', '.join(cv_cases)})"] if cv_cases != sorted(train_cases) else [])
                                   + ([f"its settings ({', '.join(cv_differs)})"] if cv_differs else []))
                               + ".")]
    lines += ["", "## Limits", "",
              "- Adult thoracic CT, axial series; other body regions, children and non-CT images are "
              "outside what it was trained on.",
              "- Both lungs as one label (`--split-lungs` separates right and left geometrically, "
              "after the network).",
              f"- Trained on {len(train_cases)} case(s)"
              + (" from one source (see Data)" if note else "")
              + ": scanners, fields of view, pathologies and contrast phases not in them are untested.",
              "- Not a medical device; not for diagnosis or treatment decisions."]
    return "\n".join(lines) + "\n"


def recipe_summary(config: dict) -> str:
    """One sentence of the settings that make the recipe, read from the config."""
    augment = [name for name, value in (get(config, "augment") or {}).items()
               if isinstance(value, dict) and float(value.get("prob", 0) or 0) > 0]
    return (f"Network `{get(config, 'model.name')}` (features {get(config, 'model.features')}); "
            f"slices {get(config, 'data.size')} px"
            + (f", spacing {get(config, 'data.spacing')} mm" if get(config, "data.spacing") is not None else "")
            + f", HU window {get(config, 'data.window')}, 2.5D context {get(config, 'data.context')}; "
            f"optimizer {get(config, 'optim.name')} at LR {get(config, 'optim.lr')}, schedule "
            f"`{get(config, 'optim.schedule')}`, EMA {get(config, 'train.ema') or 'off'}, selection "
            f"`{get(config, 'train.selection')}`; budget {get(config, 'train.epochs')} epochs, time limit "
            f"{get(config, 'train.time_limit_minutes')} min; augmentation: {', '.join(augment) or 'none'}.")


RECIPE_SECTIONS = ("data", "model", "loss", "optim", "train", "augment", "infer")


def _recipe_sections(config: dict) -> dict:
    config = portable_config(config)
    return {k: v for k, v in config.items() if k in RECIPE_SECTIONS}


def recipe_differences(model_config: dict, cv_config: dict) -> list[str]:
    """The settings (dotted keys) in which the packaged run's recipe differs from the cross-validated one."""
    ours, theirs = flatten(_recipe_sections(model_config)), flatten(_recipe_sections(cv_config))
    return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))


def _cv_config(cv_dir: Path) -> dict:
    path = cv_dir / "config.yaml"
    try:
        return resolve_config(read_yaml_file(path), str(path))
    except ConfigError as exc:
        raise CTSegError(f"{path}: cannot read the cross-validated recipe ({exc})") from exc


def cv_table(rows: list[dict]) -> list[str]:
    """Per-case test figures from `ctseg cv`'s cv.csv."""
    if not rows:
        return []
    lines = ["", "| fold | case | Dice | HD95 (mm) | train seconds |", "| ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.get('fold', '')} | {r.get('case', '')} | {r.get('dice', '')} | "
                     f"{r.get('hd95_mm', '') or 'n/a'} | {r.get('train_seconds', '')} |")
    return lines


def data_note_text(path: Path) -> str:
    """The paragraphs of a data README that say where the data came from, its licence and citation
    (all of its first paragraph when none is marked so)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CTSegError(f"{path}: cannot read the data note ({type(exc).__name__})") from exc
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip() and not p.lstrip().startswith("#")]
    kept = [p for p in paragraphs if p.lower().startswith(DATA_NOTE_STARTS)]
    if not (kept or paragraphs):
        raise CTSegError(f"{path}: the data note is empty")
    return "\n\n".join(kept or paragraphs[:1])


def _default_data_note(case_dir: str | Path | None) -> Path | None:
    readme = Path(case_dir) / "README.md" if case_dir else None
    return readme if readme is not None and readme.is_file() else None


def _read_cv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise CTSegError(f"{path}: cannot read `ctseg cv`'s per-case table ({type(exc).__name__})") from exc


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _num(value: Any, spec: str) -> str:
    return format(float(value), spec) if isinstance(value, (int, float)) else "n/a"
