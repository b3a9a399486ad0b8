"""The study's experiments as YAML pipelines: `ctseg experiment NAME` / `make experiment NAME=...`.

Why a runner of its own: a difference between two trainings is only a finding when it exceeds the
difference between two seeds of one training. Every condition of a pipeline is therefore trained
on the patient folds of `ctseg cv` (`ctseg.study.cv.plan_folds`: each case is a test case exactly
once, in a fold that never loaded it) with several seeds, scored on the fold's test cases, and
reported as mean ± sd with a paired comparison against a baseline run (`ctseg.study.paired`).

A pipeline (`pipelines/experiments/<name>.yaml`):

    title: ...
    config: pipelines/train.yaml     # optional base training config (relative to the repository root)
    base: {train: {epochs: 5}}       # shared settings, merged over `config`
    case_dir: ../shared/data/lctsc   # null: the built-in phantom of the config's `phantom` section
    seeds: [0, 1, 2]                 # train.seed of each repetition
    folds: null                      # patient folds (null: ctseg cv's default for the case count)
    baseline: ver1                   # the run every other run is compared with, pair by pair
    runs:   [{name: ver1, label: "UNet", overrides: {model.name: unet}}]
    sweeps: [{param: train_slices, values: [5, 10]}, {param: train_cases, values: [1, 2]}]
    run_overrides: {ver5: {train.epochs: 10}}   # per-run settings (e.g. inside one size)
    conditions: [{name: clean, noise_hu: 0}, {name: study, noise_fraction: 0.0763}]
    timing_repeats: 10               # forward passes timed for ms / slice (median)
    sizes:  {smoke: {...}, cpu: {...}, gpu: {...}}   # merged over the top level

Conditions add Gaussian noise to the test CT before inference: `noise_hu` gives its SD in HU,
`noise_fraction` as a share of the HU window width (`data.window`, the range the network sees as
[0, 1]). Sweep parameters: `train_slices` trains on that many slices of the fold's training
cases, taken evenly along z within each case in proportion to its slice count, so lung-free
slices keep each case's natural share (written once as NIfTI subset cases beside the run
folders); `train_cases` on the first N training cases of the fold. Every training goes through
`ctseg.train.train`, logs to one MLflow experiment (`ctseg-<name>`), is scored through the
inference path of `ctseg predict` under each condition (the scores are added to its MLflow run),
and the tables and plots go between the generated-part markers of `docs/experiments/<name>.md`;
text outside the markers (notes written by hand) is kept.
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
from matplotlib.figure import Figure

from ctseg.config import apply_overrides, config_view, load_config, read_yaml_file, resolve_config
from ctseg.data import discover_cases
from ctseg.data.cache import cache_case, load_case_volume
from ctseg.data.phantom import ensure_phantom
from ctseg.errors import ConfigError
from ctseg.evaluate.report import read_run
from ctseg.infer.model_loader import LAST, load_model
from ctseg.io import load_mask, save_nifti
from ctseg.study.compare import mean_metrics, measure_cases, run_facts
from ctseg.study.cv import default_folds, fold_config, plan_folds
from ctseg.study.paired import paired, spread
from ctseg.train import train
from ctseg.utils import atomic_path, atomic_write_text, pick_device

log = logging.getLogger(__name__)

SWEEP_PARAMS = ("train_slices", "train_cases")
SIZES_AUTO = "auto"
GENERATED_START = "<!-- generated:start (ctseg experiment writes only between these markers) -->"
GENERATED_END = "<!-- generated:end -->"
#: Written into a run folder once its training is scored: a rerun reuses it instead of retraining.
DONE = "experiment.json"
METRICS = ("dice", "raw_dice", "accuracy", "slice_dice")


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
    seeds = spec.setdefault("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: `seeds` must be a list of distinct non-negative integers, got {seeds!r}")
    folds = spec.get("folds")
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise ConfigError(f"{path}: `folds` must be an integer >= 2 or null, got {folds!r}")
    for cond in spec.get("conditions") or []:
        noise_sd(cond, {"data": {"window": [0, 1]}})  # refuses a malformed condition before training
    return spec


def noise_sd(condition: dict, config: dict) -> float:
    """The condition's noise SD in HU: `noise_hu`, or `noise_fraction` of the HU window width."""
    given = [k for k in ("noise_hu", "noise_fraction") if condition.get(k) is not None]
    if "name" not in condition or len(given) > 1:
        raise ConfigError(f"experiment condition {condition}: needs a name and at most one of "
                          "noise_hu, noise_fraction")
    value = float(condition.get(given[0], 0.0)) if given else 0.0
    if value < 0:
        raise ConfigError(f"experiment condition {condition['name']!r}: noise must be >= 0, got {value}")
    if given == ["noise_fraction"]:
        lo, hi = config_view(config).data.window
        return value * (float(hi) - float(lo))
    return value


def _overrides(mapping: dict | None) -> list[str]:
    """{dotted.key: value} -> ["dotted.key=<yaml value>"] for `apply_overrides`."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in (mapping or {}).items()]


def plan_runs(spec: dict, root: Path) -> list[PlannedRun]:
    """Every run of the pipeline with its complete training config.

    A run's config: its own `config` file (else the pipeline's), then the pipeline's `base` and
    `overrides` (the shared budget), then the run's `overrides`, then `run_overrides[name]`.
    """
    per_run = spec.get("run_overrides") or {}

    def config_for(name: str, config_path: str | None, run_overrides: dict | None) -> dict:
        config = load_config(root / config_path) if config_path else {}
        config = _merge(config, spec.get("base") or {})
        config = apply_overrides(config, _overrides(spec.get("overrides")) + _overrides(run_overrides)
                                 + _overrides(per_run.get(name)))
        config.setdefault("tracking", {})["experiment"] = f"ctseg-{spec['name']}"
        return config

    planned = []
    for run in spec.get("runs") or []:
        if "name" not in run:
            raise ConfigError(f"experiment {spec['name']}: every run needs a name ({run})")
        name = str(run["name"])
        config = config_for(name, run.get("config") or spec.get("config"), run.get("overrides"))
        planned.append(PlannedRun(name, str(run.get("label", name)), config))
    for sweep in spec.get("sweeps") or []:
        param = sweep.get("param")
        if param not in SWEEP_PARAMS:
            raise ConfigError(f"experiment {spec['name']}: sweep param must be one of {SWEEP_PARAMS}, got {param!r}")
        for value in sweep.get("values") or []:
            name = f"{param}_{value}"
            planned.append(PlannedRun(name, f"{param} = {value}",
                                      config_for(name, spec.get("config"), sweep.get("overrides")), param, int(value)))
    names = [p.name for p in planned]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment {spec['name']}: run names repeat: {names}")
    unknown = sorted(set(per_run) - set(names))
    if unknown:
        raise ConfigError(f"experiment {spec['name']}: run_overrides for unknown run(s) {unknown}")
    if spec.get("baseline") is not None and spec["baseline"] not in names:
        raise ConfigError(f"experiment {spec['name']}: baseline {spec['baseline']!r} is not a run ({names})")
    if len({json.dumps(resolve_config(p.config)["split"], sort_keys=True) for p in planned}) > 1:
        raise ConfigError(f"experiment {spec['name']}: every run must share one `split` section "
                          "(the folds are planned once for all of them)")
    return planned


# --------------------------------------------------------------------------- training-set sizes

def subset_slices(depths: list[int], n: int) -> list[tuple[int, int]]:
    """n (case, slice) picks over cases of the given depths: each case gets a share proportional to
    its slice count (largest remainder), taken at the midpoints of equal steps along z (not at
    the two ends, which a small subset would over-weight), so the lung-free slices at the ends of
    each scan keep their natural share."""
    total = sum(depths)
    n = min(n, total)
    exact = np.array(depths, dtype=float) * n / total
    share = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - share), kind="stable")[: n - int(share.sum())]:
        share[i] += 1
    return [(c, int(z)) for c, (depth, k) in enumerate(zip(depths, share)) if k
            for z in ((np.arange(k) + 0.5) * depth / k).astype(int)]


def write_slice_subsets(cases: list, folds: list[dict], counts: list[int], folder: Path) -> dict:
    """A case folder with every labelled case (as NIfTI) and, per fold and count, a
    `fold<k>_slices<n>` case of n slices of the fold's training cases (`subset_slices`).

    Stacking slices of several cases into one volume is only valid for 2D training (the runner
    refuses `data.context` > 1 for these runs). Returns {(fold, n): {"case", "slices", "lung_slices"}}.
    """
    by_name = {c.name: c for c in cases}
    volumes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def case_arrays(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if name not in volumes:
            volume = load_case_volume(by_name[name])
            volumes[name] = (volume.array, load_mask(by_name[name].label, volume), volume.affine)
        return volumes[name]

    for name in by_name:  # the folds' test and validation cases, under their own names
        target = folder / name
        if not (target / "mask.nii.gz").is_file():
            image, mask, affine = case_arrays(name)
            save_nifti(image, affine, target / "image.nii.gz", kind="image")
            save_nifti(mask, affine, target / "mask.nii.gz", kind="label")
    made = {}
    for fold in folds:
        arrays = [case_arrays(name) for name in fold["train"]]
        shapes = {a[0].shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise ConfigError(f"train_slices sweep: training cases differ in slice size {sorted(shapes)}")
        for n in counts:
            picks = subset_slices([a[0].shape[0] for a in arrays], n)
            if len(picks) < n:
                log.warning("train_slices=%d: fold %d has only %d training slices; using all",
                            n, fold["fold"], len(picks))
            name = f"fold{fold['fold']}_slices{n}"
            masks = np.stack([arrays[c][1][z] for c, z in picks])
            target = folder / name
            if not (target / "mask.nii.gz").is_file():
                save_nifti(np.stack([arrays[c][0][z] for c, z in picks]), arrays[0][2], target / "image.nii.gz",
                           kind="image")
                save_nifti(masks, arrays[0][2], target / "mask.nii.gz", kind="label")
            made[(fold["fold"], n)] = {"case": name, "slices": len(picks),
                                       "lung_slices": int(masks.reshape(len(picks), -1).any(axis=1).sum())}
    return made


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


@dataclass
class _Job:
    """One training of the experiment: a run's config on one fold with one seed."""

    run: PlannedRun
    fold: dict
    seed: int
    config: dict
    case_dir: Path
    train_slices: int | None = None  # known for slice subsets
    lung_slices: int | None = None


def _jobs(planned: list[PlannedRun], spec: dict, cases: list, case_dir: Path, output: Path) -> list[_Job]:
    """Every (run, fold, seed) training with its fold's split, in the order they run."""
    names = sorted(c.name for c in cases)
    first = resolve_config(planned[0].config)
    k = int(spec.get("folds") or default_folds(len(names)))
    folds = plan_folds(names, k, first)
    counts = sorted({p.value for p in planned if p.group == "train_slices"})
    subsets = write_slice_subsets(cases, folds, counts, output / "train_slices_cases") if counts else {}
    jobs = []
    for p in planned:
        if p.group == "train_slices" and config_view(p.config).data.context != 1:
            raise ConfigError(f"{p.name}: train_slices subsets stack slices of several cases; "
                              "they need 2D training (data.context: 1)")
        for fold in folds:
            for seed in spec["seeds"]:
                config = fold_config(resolve_config(apply_overrides(p.config, [f"train.seed={seed}"])), fold)
                job = _Job(p, fold, seed, config, case_dir)
                if p.group == "train_slices":
                    subset = subsets[(fold["fold"], p.value)]
                    config["split"]["train"] = [subset["case"]]
                    job.case_dir = output / "train_slices_cases"
                    job.train_slices, job.lung_slices = subset["slices"], subset["lung_slices"]
                elif p.group == "train_cases":
                    if p.value > len(fold["train"]):
                        raise ConfigError(f"{p.name}: fold {fold['fold']} has only {len(fold['train'])} "
                                          "training case(s)")
                    config["split"]["train"] = fold["train"][: p.value]
                jobs.append(job)
    return jobs


def run_experiment(
    name: str | Path, size: str = SIZES_AUTO, runs_root: Path = Path("runs"), output: Path | None = None,
    doc_dir: Path | None = None, device: str | None = None, search: Path | None = None,
    cache_dir: Path | None = None, tracking_uri: str | None = None,
) -> Path:
    """Train and score every (run, fold, seed) of a pipeline; write the report; returns its path.

    Run folders go to `output` (default `<runs_root>/experiments/<name>-<size>-<timestamp>`; rerun
    with the same `output` to resume: scored trainings are reused, an interrupted one continues),
    MLflow to `tracking_uri`, else the config's `tracking.uri`, else `<runs_root>/mlflow.db`, the
    preprocessing cache to the config's `data.cache_dir`, else `cache_dir`, and the report to `doc_dir` (default `docs/experiments/` of the repository; the run
    folder for the `smoke` size, so a smoke run never replaces measured results).
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
    planned = plan_runs(spec, root)
    for p in planned:
        cfg = config_view(p.config)
        p.config["tracking"]["uri"] = (tracking_uri or cfg.tracking.uri
                                       or f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}")
        if cache_dir is not None and cfg.data.cache_dir is None:
            p.config.setdefault("data", {})["cache_dir"] = str(cache_dir)
    case_dir = case_dir or ensure_phantom(planned[0].config)
    cases = [c for c in discover_cases(case_dir) if c.label is not None]
    jobs = _jobs(planned, spec, cases, case_dir, output)
    conditions = spec.get("conditions") or [{"name": "clean", "noise_hu": 0}]
    dev = pick_device(device)

    rows = []
    for i, job in enumerate(jobs, 1):
        log.info("experiment %s [%s]: training %d/%d: %s, fold %d, seed %d", name, size, i, len(jobs),
                 job.run.name, job.fold["fold"], job.seed)
        rows += _run_job(job, spec, conditions, [c for c in cases if c.name in job.fold["test"]],
                         output, device, dev)
    atomic_write_text(output / "results.csv", _csv(rows))
    return write_doc(spec, rows, doc_dir, path, root, dev)


def _run_job(job: _Job, spec: dict, conditions: list[dict], test_cases: list, output: Path,
             device: str | None, dev: torch.device) -> list[dict]:
    """Train one (run, fold, seed), score it on the fold's test cases under every condition."""
    run_dir = output / f"{job.run.name}_fold{job.fold['fold']}_seed{job.seed}"
    if (run_dir / DONE).is_file():
        log.info("%s: already trained and scored, reused", run_dir.name)
        return json.loads((run_dir / DONE).read_text())
    resume = run_dir if (run_dir / "checkpoints" / LAST).is_file() else None
    train(job.config, job.case_dir, run_dir, device=device, resume=resume)
    run = load_model(run_dir, dev)
    load = os.getloadavg()[0]  # timings on a shared machine mean little without it
    facts = run_facts(run_dir, run, dev, repeats=int(spec.get("timing_repeats", 10)))
    _, metrics = read_run(run_dir)
    split = json.loads((run_dir / "split.json").read_text())
    train_slices = job.train_slices if job.train_slices is not None else \
        _slice_count(job.case_dir, split["train"], job.config)
    rows, measured = [], {}
    for cond in conditions:
        sd = noise_sd(cond, run.config)
        per_case = measure_cases(run, test_cases, dev, noise_hu=sd, seed=job.seed,
                                 cache_dir=config_view(job.config).data.cache_dir)
        measured[cond["name"]] = means = mean_metrics(per_case, METRICS)
        rows.append({
            "run": job.run.name, "label": job.run.label, "group": job.run.group, "value": job.run.value,
            "fold": job.fold["fold"], "seed": job.seed, "test_cases": " ".join(job.fold["test"]),
            "selection": job.fold["selection"], "condition": cond["name"], "noise_hu": sd,
            "network": facts["network"], "epochs": facts["epochs"],
            "train_minutes": (metrics.get("train_seconds") or 0.0) / 60.0,
            "train_slices": train_slices, "lung_slices": job.lung_slices, "train_cases": len(split["train"]),
            **means, "params": facts["params"], "param_mb": facts["param_mb"],
            "ms_per_slice": facts["ms_per_slice"], "load_avg": load, "run_dir": str(run_dir),
        })
    _log_to_mlflow(run_dir, {f"test_{c}_{k}": v for c, m in measured.items() for k, v in m.items()},
                   {"experiment.pipeline": spec["name"], "experiment.size": spec["size"],
                    "experiment.run": job.run.name, "experiment.label": job.run.label,
                    "experiment.fold": str(job.fold["fold"]), "experiment.seed": str(job.seed)})
    atomic_write_text(run_dir / DONE, json.dumps(rows, indent=1) + "\n")
    return rows


def _slice_count(case_dir: Path, names: list[str], config: dict) -> int:
    """Slices in the named cases, from the preprocessing cache that training filled."""
    return sum(cache_case(c, config, config_view(config).data.cache_dir).shape[0]
               for c in discover_cases(case_dir) if c.name in names)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# --------------------------------------------------------------------------- statistics

def summarize(rows: list[dict], baseline: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Per (run, condition): mean ± sd over folds x seeds; the paired comparison of every other
    run with `baseline` under the same condition; and of every condition of a run with the run's
    first condition (the same trainings: what the condition alone changes). Pairs: (fold, seed)."""
    keys = list(dict.fromkeys((r["run"], r["condition"]) for r in rows))
    groups = {key: [r for r in rows if (r["run"], r["condition"]) == key] for key in keys}
    summary = []
    for (run, cond), members in groups.items():
        first = members[0]
        summary.append({
            **{k: first[k] for k in ("run", "label", "group", "value", "condition", "noise_hu", "network",
                                     "epochs", "params")},
            "train_slices": spread([m["train_slices"] for m in members])["mean"],
            "lung_slices": None if first["lung_slices"] is None else
            spread([m["lung_slices"] for m in members])["mean"],
            "train_minutes": spread([m["train_minutes"] for m in members])["mean"],
            "ms_per_slice": float(np.median([m["ms_per_slice"] for m in members])),
            **{f"{k}_{s}": v for k in METRICS for s, v in spread([m[k] for m in members]).items()},
            "seed_sd": _seed_sd(members),
        })
    first_condition = keys[0][1]
    comparisons = _paired_rows(groups, lambda run, cond: (baseline, cond), baseline)
    by_condition = _paired_rows(groups, lambda run, cond: (run, first_condition), first_condition)
    return summary, comparisons, by_condition


def _paired_rows(groups: dict, reference_of, label: str) -> list[dict]:
    """Each group paired (by fold and seed) with its reference group `reference_of(run, cond)`;
    groups that are their own reference, or whose reference did not run, are left out."""
    rows = []
    for (run, cond), members in groups.items():
        reference = reference_of(run, cond)
        if reference == (run, cond) or reference not in groups:
            continue
        base = {(r["fold"], r["seed"]): r["dice"] for r in groups[reference]}
        other = {(r["fold"], r["seed"]): r["dice"] for r in members}
        rows.append({"run": run, "condition": cond, "baseline": label, **paired(base, other)})
    return rows


def _seed_sd(members: list[dict]) -> float:
    """Seed-to-seed spread of the volume Dice: the root mean within-fold variance over seeds."""
    by_fold: dict[int, list[float]] = {}
    for m in members:
        by_fold.setdefault(m["fold"], []).append(m["dice"])
    variances = [np.var(v, ddof=1) for v in by_fold.values() if len(v) > 1]
    return float(np.sqrt(np.mean(variances))) if variances else float("nan")


# --------------------------------------------------------------------------- report

def merge_generated(existing: str | None, generated: str) -> str:
    """`generated` placed between the markers of `existing`, everything outside them kept.

    A document without markers (written before them, or by hand) is kept whole below the new
    generated part, so no note is ever lost.
    """
    block = f"{GENERATED_START}\n{generated.rstrip()}\n{GENERATED_END}\n"
    if not existing:
        return block
    start, end = existing.find(GENERATED_START), existing.find(GENERATED_END)
    if start < 0 or end < start:
        return f"{block}\n{existing}"
    return existing[:start] + block.rstrip("\n") + existing[end + len(GENERATED_END):]


def _errorbar_plot(summary: list[dict], group: str, conditions: list[str], path: Path, title: str) -> Path:
    """Mean ± sd test Dice per run (or sweep value), one series per condition."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    members = [s for s in summary if s["group"] == group]
    runs = list(dict.fromkeys(s["run"] for s in members))
    for i, cond in enumerate(conditions):
        sel = [s for s in members if s["condition"] == cond]
        x = np.arange(len(sel)) + 0.06 * (i - (len(conditions) - 1) / 2) if group == "runs" \
            else np.array([s["value"] for s in sel], dtype=float)
        ax.errorbar(x, [s["dice_mean"] for s in sel], yerr=[np.nan_to_num(s["dice_sd"]) for s in sel],
                    marker="o", capsize=3, label=f"test {cond}")
    if group == "runs":
        ax.set_xticks(np.arange(len(runs)), runs)
    ax.set_xlabel({"runs": "run", "train_slices": "training slices", "train_cases": "training cases"}[group])
    ax.set_ylabel("test volume Dice (mean ± sd)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(conditions) > 1:
        ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _pm(mean: float, sd: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + ("" if np.isnan(sd) else f" ± {sd:.{digits}f}")


def _p(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3g}"


def write_doc(spec: dict, rows: list[dict], doc_dir: Path, pipeline: Path, root: Path,
              device: torch.device) -> Path:
    """The generated part of `<doc_dir>/<name>.md` (tables, statistics) and `<name>*.png` plots."""
    name = spec["name"]
    doc_dir = Path(doc_dir)
    baseline = spec.get("baseline") or rows[0]["run"]
    summary, comparisons, by_condition = summarize(rows, baseline)
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    plots = []
    for group in dict.fromkeys(s["group"] for s in summary):
        suffix = "" if not plots else f"_{group}"
        plots.append(_errorbar_plot(summary, group, conditions, doc_dir / f"{name}{suffix}.png",
                                    spec.get("title", name)))
    try:
        pipeline_ref = pipeline.resolve().relative_to(root)
    except ValueError:
        pipeline_ref = pipeline
    folds = sorted({r["fold"] for r in rows})
    tests = {r["fold"]: r["test_cases"] for r in rows}
    selection = sorted({r["selection"] for r in rows})
    rerun = f"make experiment NAME={name}" + (f' ARGS="--size {spec["size"]}"' if spec["size"] != "cpu" else "")
    loads = [r["load_avg"] for r in rows]
    lines = [f"# Experiment: {spec.get('title', name)}", ""]
    if spec.get("description"):
        lines += [str(spec["description"]).strip(), ""]
    lines += [
        f"- pipeline: `{pipeline_ref}` (size `{spec['size']}`); rerun with `{rerun}`",
        f"- measured {dt.date.today().isoformat()} on {device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads); 1-minute load average when each "
        f"training was timed: {min(loads):.1f}-{max(loads):.1f} (ms / slice: median forward pass of one "
        "inference batch per slice; on a busy machine it measures the load as well as the network)",
        f"- cases: `{spec.get('case_dir') or 'built-in phantom'}`; MLflow experiment `ctseg-{name}`; "
        f"results per training: `results.csv` in the output folder",
        f"- every condition trained {len(folds)} folds x {len(spec['seeds'])} seeds (seeds "
        f"{', '.join(map(str, spec['seeds']))}); patient folds of `ctseg cv`, test cases: "
        + "; ".join(f"fold {k}: {tests[k]}" for k in folds)
        + f"; checkpoint selection: {', '.join(selection)} (last: fixed length, the test case steers nothing)",
        "- scores: the kept checkpoint through `ctseg predict`'s inference path and post-processing on the "
        "fold's test case(s) (raw Dice: before post-processing); mean ± sd over folds x seeds; seed sd: "
        "root mean within-fold variance over seeds; noise conditions add Gaussian noise of the given SD "
        "(HU) to the test CT",
        "",
        "| run | description | condition | network | train slices | epochs | n | volume Dice | seed sd "
        "| raw Dice | accuracy | slice Dice | train min | params | ms / slice |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        cond = s["condition"] + (f" ({s['noise_hu']:.4g} HU)" if s["noise_hu"] else "")
        slices = f"{s['train_slices']:.0f}" + ("" if s["lung_slices"] is None else f" ({s['lung_slices']:.0f} lung)")
        lines.append(
            f"| {s['run']} | {s['label']} | {cond} | {s['network']} | {slices} | {s['epochs']} | {s['dice_n']} "
            f"| {_pm(s['dice_mean'], s['dice_sd'])} | {_p(s['seed_sd'])} | {_pm(s['raw_dice_mean'], s['raw_dice_sd'])} "
            f"| {_pm(s['accuracy_mean'], s['accuracy_sd'])} | {_pm(s['slice_dice_mean'], s['slice_dice_sd'])} "
            f"| {s['train_minutes']:.1f} | {s['params']:,} | {s['ms_per_slice']:.2f} |")
    lines += ["", f"Paired against `{baseline}` (same fold, seed and condition; difference = run - "
              f"{baseline} in test volume Dice). Verdict `real`: |mean| > 2 sd of the paired differences; "
              "`within seed spread` otherwise. p: two-sided paired t-test and Wilcoxon signed-rank test "
              "(pairs share folds, so they are not fully independent: read p as a guide).", "",
              "| run | condition | difference (mean ± sd) | pairs | paired t p | Wilcoxon p | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in comparisons:
        lines.append(f"| {c['run']} | {c['condition']} | {_pm(c['diff_mean'], c['diff_sd'])} | {c['diff_n']} "
                     f"| {_p(c['t_p'])} | {_p(c['wilcoxon_p'])} | {c['verdict']} |")
    if by_condition:
        lines += ["", f"Each condition against `{conditions[0]}` for the same trainings (same run, fold and seed; "
                  f"difference = condition - {conditions[0]} in test volume Dice; verdict and p as above).", "",
                  "| run | condition | difference (mean ± sd) | pairs | paired t p | Wilcoxon p | verdict |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c in by_condition:
            lines.append(f"| {c['run']} | {c['condition']} | {_pm(c['diff_mean'], c['diff_sd'])} | {c['diff_n']} "
                         f"| {_p(c['t_p'])} | {_p(c['wilcoxon_p'])} | {c['verdict']} |")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    doc = doc_dir / f"{name}.md"
    existing = doc.read_text() if doc.is_file() else None
    atomic_write_text(doc, merge_generated(existing, "\n".join(lines)))
    return doc
