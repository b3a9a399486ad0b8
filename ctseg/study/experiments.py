"""The study's experiments as YAML pipelines: `ctseg experiment NAME` / `make experiment NAME=...`.

A pipeline (`pipelines/experiments/<name>.yaml`) names a base training config, the overrides
every run shares (the budget), the runs (each with its own overrides) and optional sweeps, the
validation conditions (Gaussian noise in HU added to the validation CT) and per-machine sizes:

    title: ...
    config: pipelines/train.yaml     # base training config (relative to the repository root)
    base: {train: {epochs: 5}}       # shared settings, merged over `config`
    case_dir: ../shared/data/lctsc   # null: the built-in phantom of the config's `phantom` section
    runs:   [{name: ver1, label: "UNet", overrides: {model.name: unet}}]
    sweeps: [{param: train_slices, values: [5, 10]}, {param: train_cases, values: [1, 2]}]
    conditions: [{name: clean, noise_hu: 0}, {name: noisy, noise_hu: 50}]
    timing_repeats: 10               # forward passes timed for ms / slice (median)
    sizes:  {smoke: {...}, cpu: {...}, gpu: {...}}   # merged over the top level

Sweep parameters: `train_slices` trains on that many foreground slices spread evenly over the
training cases (written once as a NIfTI subset case beside the run folders), `train_cases` on the
first N training cases; the validation cases stay fixed. Every run trains through
`ctseg.train.train`, logs to one MLflow experiment (`ctseg-<name>`), is measured through the
inference path of `ctseg predict` under each condition (the measures are added to its MLflow
run), and the table and plot go to `docs/experiments/<name>.md`.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ctseg.config import apply_overrides, get, load_config, read_yaml_file
from ctseg.data import discover_cases
from ctseg.data.cache import cache_case, load_case_volume
from ctseg.data.phantom import ensure_phantom
from ctseg.data.split import make_split
from ctseg.errors import ConfigError
from ctseg.evaluate import figures
from ctseg.evaluate.report import read_run
from ctseg.io import load_mask, save_nifti
from ctseg.infer.model_loader import load_model
from ctseg.study.compare import mean_metrics, measure_cases, run_case_dir, run_facts, validation_cases
from ctseg.train import train
from ctseg.utils import atomic_write_text, pick_device

log = logging.getLogger(__name__)

SWEEP_PARAMS = ("train_slices", "train_cases")
SIZES_AUTO = "auto"


@dataclass
class PlannedRun:
    name: str
    label: str
    config: dict
    group: str = "runs"  # "runs", or the sweep parameter
    value: Any = None  # the sweep value (None for plain runs)


def repo_root_of(pipeline: Path) -> Path:
    """The folder holding `pipelines/` above `pipeline`: relative paths in a pipeline start there."""
    for parent in Path(pipeline).resolve().parents:
        if parent.name == "pipelines":
            return parent.parent
    return Path(pipeline).resolve().parent


def find_pipeline(name: str | Path, search: Path | None = None) -> Path:
    """`name` as a YAML path, else `<search>/<name>.yaml`; by default `pipelines/experiments/` of
    the working directory, then of the source checkout ctseg runs from."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    folders = [search] if search else [Path("pipelines/experiments"),
                                       Path(__file__).resolve().parents[2] / "pipelines" / "experiments"]
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")})
    raise ConfigError(f"no experiment pipeline {name!r} in {', '.join(map(str, folders))}; "
                      f"known: {', '.join(known) or 'none'}")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def load_pipeline(path: Path, size: str = SIZES_AUTO) -> dict:
    """The pipeline with its `size` section merged over the top level (`auto`: gpu with CUDA, else cpu)."""
    try:
        spec = read_yaml_file(path) or {}  # size, depth and aliases capped
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read experiment pipeline ({exc})") from exc
    sizes = spec.pop("sizes", {}) or {}
    if size == SIZES_AUTO:
        size = "gpu" if torch.cuda.is_available() and "gpu" in sizes else "cpu"
    if size not in sizes and size != "cpu":
        raise ConfigError(f"{path}: no size {size!r} (sizes: {', '.join(sizes) or 'none'})")
    spec = _merge(spec, sizes.get(size) or {})
    spec["size"] = size
    spec.setdefault("name", Path(path).stem)
    if not spec.get("runs") and not spec.get("sweeps"):
        raise ConfigError(f"{path}: an experiment needs `runs` or `sweeps`")
    return spec


def _overrides(mapping: dict | None) -> list[str]:
    """{dotted.key: value} -> ["dotted.key=<yaml value>"] for `apply_overrides`."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in (mapping or {}).items()]


def plan_runs(spec: dict, root: Path) -> list[PlannedRun]:
    """Every run of the pipeline with its complete training config.

    A run's config: its own `config` file (else the pipeline's), then the pipeline's `base` and
    `overrides` (the shared budget), then the run's `overrides`.
    """
    def config_for(config_path: str | None, run_overrides: dict | None) -> dict:
        config = load_config(root / config_path) if config_path else {}
        config = _merge(config, spec.get("base") or {})
        config = apply_overrides(config, _overrides(spec.get("overrides")) + _overrides(run_overrides))
        config.setdefault("tracking", {})["experiment"] = f"ctseg-{spec['name']}"
        return config

    planned = []
    for run in spec.get("runs") or []:
        if "name" not in run:
            raise ConfigError(f"experiment {spec['name']}: every run needs a name ({run})")
        config = config_for(run.get("config") or spec.get("config"), run.get("overrides"))
        planned.append(PlannedRun(str(run["name"]), str(run.get("label", run["name"])), config))
    for sweep in spec.get("sweeps") or []:
        param = sweep.get("param")
        if param not in SWEEP_PARAMS:
            raise ConfigError(f"experiment {spec['name']}: sweep param must be one of {SWEEP_PARAMS}, got {param!r}")
        for value in sweep.get("values") or []:
            planned.append(PlannedRun(f"{param}_{value}", f"{param} = {value}",
                                      config_for(spec.get("config"), sweep.get("overrides")), param, int(value)))
    names = [p.name for p in planned]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment {spec['name']}: run names repeat: {names}")
    return planned


# --------------------------------------------------------------------------- training-set sizes

def _base_split(cases: list, config: dict) -> dict:
    split = make_split([c.name for c in cases], get(config, "split") or {})
    if not split["val"]:
        raise ConfigError("train_size sweeps need validation cases (split.val or split.val_fraction)")
    return split


def write_slice_subsets(cases: list, split: dict, counts: list[int], folder: Path) -> Path:
    """A case folder with the validation cases and one `train_slices_<n>` case per count, as NIfTI.

    The n slices are foreground slices of the training cases, evenly spaced over all of them
    in (case, slice) order, so each smaller subset is drawn from the same spread of anatomy.
    Stacking slices of several cases into one volume is only valid for 2D training (the
    runner refuses `data.context` > 1 for these runs).
    """
    by_name = {c.name: c for c in cases}
    for name in split["val"]:
        target = folder / name
        if not (target / "mask.nii.gz").is_file():
            volume = load_case_volume(by_name[name])
            save_nifti(volume.array, volume.affine, target / "image.nii.gz", kind="image")
            save_nifti(load_mask(by_name[name].label, volume), volume.affine, target / "mask.nii.gz", kind="label")
    images, masks, affine = [], [], None
    for name in split["train"]:
        volume = load_case_volume(by_name[name])
        mask = load_mask(by_name[name].label, volume)
        keep = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        images += [volume.array[k] for k in keep]
        masks += [mask[k] for k in keep]
        affine = volume.affine if affine is None else affine
    if not images:
        raise ConfigError("train_size sweep: the training cases have no foreground slices")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ConfigError(f"train_size sweep: training cases differ in slice size {sorted(shapes)}")
    for n in counts:
        if n > len(images):
            log.warning("train_slices=%d: only %d foreground training slices exist; using all", n, len(images))
        pick = np.unique(np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int))
        target = folder / f"train_slices_{n}"
        save_nifti(np.stack([images[i] for i in pick]), affine, target / "image.nii.gz", kind="image")
        save_nifti(np.stack([masks[i] for i in pick]), affine, target / "mask.nii.gz", kind="label")
    return folder


def _prepare_sweeps(planned: list[PlannedRun], case_dir: Path | None, output: Path) -> dict[str, Path | None]:
    """Fix each sweep run's split (and case folder); returns run name -> case folder to train on."""
    folders: dict[str, Path | None] = {p.name: case_dir for p in planned}
    sweeps = [p for p in planned if p.group in SWEEP_PARAMS]
    if not sweeps:
        return folders
    root = case_dir if case_dir is not None else ensure_phantom(sweeps[0].config)
    cases = discover_cases(root)
    split = _base_split(cases, sweeps[0].config)
    counts = sorted({p.value for p in sweeps if p.group == "train_slices"})
    subsets = write_slice_subsets(cases, split, counts, output / "train_slices_cases") if counts else None
    for p in sweeps:
        if p.group == "train_slices":
            if int(get(p.config, "data.context", 1)) != 1:
                raise ConfigError(f"{p.name}: train_slices subsets stack slices of several cases; "
                                  "they need 2D training (data.context: 1)")
            p.config["split"] = {"train": [f"train_slices_{p.value}"], "val": list(split["val"])}
            folders[p.name] = subsets
        else:
            if p.value > len(split["train"]):
                raise ConfigError(f"{p.name}: only {len(split['train'])} training case(s) available")
            p.config["split"] = {"train": split["train"][: p.value], "val": list(split["val"])}
            folders[p.name] = root
    return folders


# --------------------------------------------------------------------------- running

def _log_to_mlflow(run_dir: Path, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """Add the experiment's measures to the run's MLflow run (best effort, like training's tracker)."""
    info_path = run_dir / "tracking.json"
    if not info_path.is_file():
        return
    try:
        from mlflow.tracking import MlflowClient

        info = json.loads(info_path.read_text())
        client = MlflowClient(tracking_uri=info["tracking_uri"])
        for key, value in metrics.items():
            if value is not None and np.isfinite(value):
                client.log_metric(info["run_id"], key, float(value))
        for key, value in tags.items():
            client.set_tag(info["run_id"], key, value)
    except Exception as exc:  # tracking is not essential: the table is written regardless
        log.warning("MLflow: could not add experiment measures to %s (%s: %s)", run_dir, type(exc).__name__, exc)


def run_experiment(
    name: str | Path, size: str = SIZES_AUTO, runs_root: Path = Path("runs"), output: Path | None = None,
    doc_dir: Path | None = None, device: str | None = None, search: Path | None = None,
) -> Path:
    """Train and measure every run of a pipeline; write the results table; returns the Markdown path.

    Run folders go to `output` (default `<runs_root>/experiments/<name>-<size>-<timestamp>`), MLflow
    to `<runs_root>/mlflow.db` unless MLFLOW_TRACKING_URI or the config's `tracking.uri` is set, and
    the report to `doc_dir` (default `docs/experiments/` of the repository; the run folder for the
    `smoke` size, so a smoke run never replaces measured results).
    """
    path = find_pipeline(name, search)
    root = repo_root_of(path)
    spec = load_pipeline(path, size)
    name, size = spec["name"], spec["size"]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(output) if output else Path(runs_root) / "experiments" / f"{name}-{size}-{stamp}"
    if doc_dir is None:
        doc_dir = output if size == "smoke" else root / "docs" / "experiments"
    case_dir = spec.get("case_dir")
    case_dir = (root / case_dir).resolve() if case_dir else None
    if case_dir is not None and not case_dir.is_dir():
        raise ConfigError(f"experiment {name}: case folder {case_dir} not found")
    conditions = spec.get("conditions") or [{"name": "clean", "noise_hu": 0}]
    planned = plan_runs(spec, root)
    for p in planned:
        if not get(p.config, "tracking.uri"):
            p.config["tracking"]["uri"] = f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"
    folders = _prepare_sweeps(planned, case_dir, output)
    dev = pick_device(device)

    rows = []
    for i, p in enumerate(planned, 1):
        log.info("experiment %s [%s]: run %d/%d %s (%s)", name, size, i, len(planned), p.name, p.label)
        run_dir = train(p.config, folders[p.name], output / p.name, device=device)
        run = load_model(run_dir, dev)
        load = os.getloadavg()[0]  # timings on a shared machine mean little without it
        facts = run_facts(run_dir, run, dev, repeats=int(spec.get("timing_repeats", 10)))
        _, metrics = read_run(run_dir)
        trained_on = run_case_dir(run.config)
        cases = validation_cases(run_dir, trained_on)
        split = json.loads((run_dir / "split.json").read_text())
        train_slices = _slice_count(trained_on, split["train"], run.config)
        measured = {}
        for cond in conditions:
            per_case = measure_cases(run, cases, dev, noise_hu=float(cond.get("noise_hu", 0)),
                                     seed=int(get(run.config, "train.seed", 0)))
            means = mean_metrics(per_case)
            measured[cond["name"]] = means
            rows.append({
                "run": p.name, "label": p.label, "group": p.group, "value": p.value,
                "condition": cond["name"], "noise_hu": float(cond.get("noise_hu", 0)),
                "network": facts["network"], "epochs": facts["epochs"],
                "train_minutes": (metrics.get("train_seconds") or 0.0) / 60.0,
                "train_slices": train_slices,
                "train_cases": len(split["train"]), "val_cases": len(cases),
                **means, "params": facts["params"], "param_mb": facts["param_mb"],
                "ms_per_slice": facts["ms_per_slice"], "load_avg": load, "run_dir": str(run_dir),
            })
        _log_to_mlflow(run_dir, {f"eval_{c}_{k}": v for c, m in measured.items() for k, v in m.items()},
                       {"experiment.pipeline": name, "experiment.size": size, "experiment.label": p.label})

    atomic_write_text(output / "results.csv", _csv(rows))
    return write_doc(spec, rows, doc_dir, path, root, dev)


def _slice_count(case_dir: Path, names: list[str], config: dict) -> int:
    """Slices in the named cases, from the preprocessing cache that training filled."""
    return sum(cache_case(c, config, get(config, "data.cache_dir")).shape[0]
               for c in discover_cases(case_dir) if c.name in names)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------------- report

def write_doc(spec: dict, rows: list[dict], doc_dir: Path, pipeline: Path, root: Path,
              device: torch.device) -> Path:
    """`<doc_dir>/<name>.md` with the table and `<name>*.png` plots (one per run group)."""
    name = spec["name"]
    doc_dir = Path(doc_dir)
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    plots = []
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        series = {}
        for cond in conditions:
            sel = [r for r in members if r["condition"] == cond]
            x = [r["run"] if group == "runs" else r["value"] for r in sel]
            noise = f" ({sel[0]['noise_hu']:g} HU noise)" if sel and sel[0]["noise_hu"] else ""
            series[f"validation {cond}{noise}" if len(conditions) > 1 else "validation"] = \
                (x, [r["dice"] for r in sel])
        suffix = "" if not plots else f"_{group}"
        xlabel = {"runs": "run", "train_slices": "training slices", "train_cases": "training cases"}[group]
        plots.append(figures.line_plot(series, doc_dir / f"{name}{suffix}.png", title=spec.get("title", name),
                                       xlabel=xlabel, ylabel="validation volume Dice",
                                       categorical=group == "runs"))
    try:
        pipeline_ref = pipeline.resolve().relative_to(root)
    except ValueError:
        pipeline_ref = pipeline
    lines = [f"# Experiment: {spec.get('title', name)}", ""]
    if spec.get("description"):
        lines += [str(spec["description"]).strip(), ""]
    rerun = f"make experiment NAME={name}" + (f' ARGS="--size {spec["size"]}"' if spec["size"] == "smoke" else "")
    lines += [
        f"- pipeline: `{pipeline_ref}` (size `{spec['size']}`); rerun with `{rerun}`",
        f"- measured {dt.date.today().isoformat()} on {device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads); 1-minute load average when each "
        f"run was timed: {min(r['load_avg'] for r in rows):.1f}-{max(r['load_avg'] for r in rows):.1f} "
        "(ms / slice: median forward pass of one inference batch at the training size, per slice; on a busy "
        "machine it measures the load as well as the network)",
        f"- cases: `{spec.get('case_dir') or 'built-in phantom'}`; MLflow experiment `ctseg-{name}`",
        "- Dice, accuracy and per-slice Dice: best checkpoint through `ctseg predict`'s inference path and "
        "post-processing on the validation cases (mean over cases; raw Dice: before post-processing); noise "
        "conditions add Gaussian noise of the given SD (HU) to the CT",
        "",
        "| run | description | condition | network | train slices | train cases | epochs | train min "
        "| volume Dice | raw Dice | accuracy | slice Dice | params | ms / slice |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cond = r["condition"] + (f" ({r['noise_hu']:g} HU)" if r["noise_hu"] else "")
        lines.append(f"| {r['run']} | {r['label']} | {cond} | {r['network']} | {r['train_slices']} "
                     f"| {r['train_cases']} | {r['epochs']} | {r['train_minutes']:.1f} | {r['dice']:.4f} | {r['raw_dice']:.4f} "
                     f"| {r['accuracy']:.4f} | {r['slice_dice']:.4f} | {r['params']:,} | {r['ms_per_slice']:.2f} |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    doc = doc_dir / f"{name}.md"
    atomic_write_text(doc, "\n".join(lines) + "\n")
    return doc
