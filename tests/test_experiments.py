"""The study's experiment pipelines: seeds x patient folds, statistics, noise conditions that reach the
network, natural-proportion slice subsets, and generated docs that keep hand-written notes."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ctseg.cli import main
from ctseg.config import resolve_config
from ctseg.data import discover_cases
from ctseg.errors import ConfigError
from ctseg.infer.model_loader import LoadedModel
from ctseg.networks import build_network
from ctseg.study.compare import measure_cases
from ctseg.study.experiments import (GENERATED_END, GENERATED_START, find_pipeline, load_pipeline, merge_generated,
                                     noise_sd, plan_runs, repo_root_of, run_experiment, subset_slices)
from ctseg.study.paired import paired

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines" / "experiments"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, monkeypatch_module) -> Path:
    """One MLflow store and preprocessing cache for the module (the store's set-up costs seconds);
    the cache through the environment, as a user sets it: the CLI passes it down."""
    root = tmp_path_factory.mktemp("experiments")
    monkeypatch_module.setenv("CTSEG_CACHE_DIR", str(root / "cache"))
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _mlflow_runs(runs_root: Path, name: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{runs_root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"ctseg-{name}")
    assert experiment is not None
    return client.search_runs([experiment.experiment_id])


def _tables(doc: Path) -> list[list[list[str]]]:
    """The Markdown tables of `doc`, each as rows of cells (header and rule left out)."""
    tables, current = [], []
    for line in doc.read_text().splitlines() + [""]:
        if line.startswith("| "):
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current[2:])
            current = []
    return tables


@pytest.mark.slow  # a few dozen tiny trainings: minutes on a loaded 2-core machine
@pytest.mark.parametrize("name, runs, conditions", [
    ("versions", ["ver1", "ver2", "ver3", "ver4", "ver5"], ["clean"]),
    ("noise", ["train_clean", "train_noisy"], ["clean", "noisy", "very noisy", "study level"]),
    ("train_size", ["train_slices_2", "train_slices_4", "train_cases_1"], ["clean"]),
])
def test_experiment_smoke(name, runs, conditions, runs_root, tmp_path):
    output = tmp_path / "runs"
    args = ["experiment", name, "--size", "smoke", "--runs-root", str(runs_root), "--output", str(output)]
    assert main(args) == 0
    spec = load_pipeline(PIPELINES / f"{name}.yaml", "smoke")
    seeds, folds = spec["seeds"], range(spec["folds"])

    doc = output / f"{name}.md"  # smoke results stay beside the runs, never in docs/
    summary, comparisons, *by_condition = _tables(doc)
    assert [(row[0], row[2].split(" (")[0]) for row in summary] == [(r, c) for r in runs for c in conditions]
    for row in summary:
        assert int(row[6]) == len(seeds) * len(folds)  # n: every fold with every seed
        mean = float(row[7].split(" ± ")[0])
        assert 0.0 <= mean <= 1.0
    baseline = spec["baseline"]
    assert [(row[0], row[1]) for row in comparisons] == [(r, c) for r in runs if r != baseline for c in conditions]
    assert all(int(row[3]) == len(seeds) * len(folds) for row in comparisons)  # paired by (fold, seed)
    if len(conditions) > 1:  # each condition against the first, for the same trainings
        assert [(row[0], row[1]) for row in by_condition[0]] == [(r, c) for r in runs for c in conditions[1:]]
    else:
        assert by_condition == []
    for link in re.findall(r"\]\(([^)]+\.png)\)", doc.read_text()):
        assert (output / link).stat().st_size > 1000

    with open(output / "results.csv") as fh:
        results = list(csv.DictReader(fh))
    assert len(results) == len(runs) * len(folds) * len(seeds) * len(conditions)
    trainings = {f"{r}_fold{k}_seed{s}" for r in runs for k in folds for s in seeds}
    assert {Path(r["run_dir"]).name for r in results} == trainings
    for run_dir in trainings:
        assert (output / run_dir / "checkpoints" / "best.pt").is_file()
    for r in results:  # each fold is scored on its own test cases, which it never trained on
        split = (output / Path(r["run_dir"]).name / "split.json").read_text()
        assert all(case in split for case in r["test_cases"].split())
        assert r["selection"] == "last"

    tracked = _mlflow_runs(runs_root, name)
    assert sorted(r.info.run_name for r in tracked) == sorted(trainings)
    for r in tracked:
        assert "test_clean_dice" in r.data.metrics
        assert r.data.tags["experiment.pipeline"] == name

    if name == "train_size":
        slices = {(r["run"], r["fold"]): (int(r["train_slices"]), r["lung_slices"]) for r in results}
        assert all(slices[("train_slices_2", k)][0] == 2 and slices[("train_slices_4", k)][0] == 4
                   for k in ("0", "1"))
        assert all(int(lung) <= n for n, lung in slices.values() if lung)
    if name == "noise":
        _rerun_keeps_notes_and_trainings(args, doc, runs_root, len(tracked))


def _rerun_keeps_notes_and_trainings(args: list[str], doc: Path, runs_root: Path, tracked: int) -> None:
    """A rerun into the same folder reuses every scored training and rewrites only the generated part."""
    doc.write_text("Intro written by hand.\n\n" + doc.read_text() + "\n## Notes\n\nkept by hand\n")
    (doc.parent / "results.csv").unlink()
    assert main(args) == 0
    text = doc.read_text()
    assert text.startswith("Intro written by hand.\n\n" + GENERATED_START)
    assert text.endswith(GENERATED_END + "\n\n## Notes\n\nkept by hand\n")
    assert text.count(GENERATED_START) == 1 and (doc.parent / "results.csv").is_file()
    assert len(_mlflow_runs(runs_root, "noise")) == tracked  # nothing retrained


def test_merge_generated_replaces_only_the_marked_part():
    first = merge_generated(None, "# table v1")
    assert first == f"{GENERATED_START}\n# table v1\n{GENERATED_END}\n"
    edited = "before\n" + first + "after: a note\n"
    again = merge_generated(edited, "# table v2\n")
    assert again == f"before\n{GENERATED_START}\n# table v2\n{GENERATED_END}\nafter: a note\n"
    # a document from before the markers is kept whole, below the new generated part
    old = "# Experiment\n| old table |\n\n## Notes (by hand)\n- finding\n"
    assert merge_generated(old, "# new") == f"{GENERATED_START}\n# new\n{GENERATED_END}\n\n{old}"


def test_noise_levels_reach_the_network_as_different_inputs(phantom_dir, tmp_path):
    """Each condition is scored on its own noisy CT: what the network receives differs between
    levels, and more noise moves the input further from the clean one."""
    config = resolve_config({"data": {"window": [-1000, 400], "size": [32, 32]},
                             "model": {"name": "unet", "features": [4, 8]}})
    torch.manual_seed(0)
    model = build_network("unet", 1, 1, features=[4, 8]).eval()
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    run = LoadedModel(model, config, {"name": "unet", "in_channels": 1}, Path("unused"), kind="run")
    case = discover_cases(phantom_dir)[:1]

    inputs = {}
    for sd in (0.0, 50.0, 100.0):
        seen.clear()
        rows = measure_cases(run, case, "cpu", noise_hu=sd, seed=0, cache_dir=tmp_path)
        assert rows[0]["noise_hu"] == sd
        inputs[sd] = torch.cat(seen)
    clean = inputs[0.0]
    moved = {sd: float((inputs[sd] - clean).abs().mean()) for sd in (50.0, 100.0)}
    assert moved[50.0] > 0.005  # 50 HU is 0.036 of the 1400 HU window: far above rounding
    assert moved[100.0] > 1.5 * moved[50.0]


def test_noise_condition_in_hu_or_as_share_of_the_window():
    config = {"data": {"window": [-1000, 400]}}
    assert noise_sd({"name": "clean"}, config) == 0.0
    assert noise_sd({"name": "hu", "noise_hu": 50}, config) == 50.0
    # the X-ray study's SD 5000 on a 16-bit scale, as the same share of the HU window width
    assert noise_sd({"name": "study", "noise_fraction": 5000 / 65535}, config) == pytest.approx(106.8, abs=0.05)
    for bad in ({"name": "both", "noise_hu": 1, "noise_fraction": 0.1}, {"noise_hu": 1},
                {"name": "negative", "noise_hu": -5}):
        with pytest.raises(ConfigError):
            noise_sd(bad, config)


def test_slice_subsets_keep_each_case_natural_lung_free_share():
    depths = [120, 60]
    lung = [np.r_[np.zeros(30), np.ones(60), np.zeros(30)].astype(bool),  # 50% lung-free
            np.r_[np.zeros(6), np.ones(48), np.zeros(6)].astype(bool)]    # 20% lung-free
    for n in (15, 45, 90):
        picks = subset_slices(depths, n)
        assert len(picks) == n == len(set(picks))
        per_case = [[z for c, z in picks if c == i] for i in range(2)]
        assert [len(p) for p in per_case] == [round(n * 2 / 3), round(n / 3)]  # shares of the slice count
        for i, zs in enumerate(per_case):
            free = int((~lung[i][zs]).sum())
            assert abs(free - len(zs) * (~lung[i]).mean()) <= 1.5  # each case's natural share
    assert len(subset_slices(depths, 1000)) == sum(depths)  # more than exist: all of them


def test_paired_comparison_tells_real_differences_from_seed_spread():
    base = {(fold, seed): 0.90 + 0.01 * fold + 0.002 * seed for fold in range(3) for seed in range(3)}
    better = {k: v + 0.03 + (0.004 if k[1] == 1 else -0.002) for k, v in base.items()}
    noisy = {k: v + (0.02 if k[1] == 0 else -0.015) for k, v in base.items()}
    real, within = paired(base, better), paired(base, noisy)
    assert real["verdict"] == "real" and real["diff_n"] == 9 and real["t_p"] < 0.001
    assert real["diff_mean"] == pytest.approx(0.03, abs=1e-9)
    assert within["verdict"] == "within seed spread" and within["t_p"] > 0.05
    assert paired(base, dict(base))["verdict"] == "identical"
    assert paired(base, {(0, 0): 0.5})["verdict"] == "too few pairs"


def test_pipelines_plan_every_size():
    for path in sorted(PIPELINES.glob("*.yaml")):
        for size in ("smoke", "cpu", "gpu"):
            spec = load_pipeline(path, size)
            planned = plan_runs(spec, repo_root_of(path))
            assert planned and all(p.config["tracking"]["experiment"] == f"ctseg-{path.stem}" for p in planned)
            if size != "smoke":
                assert len(spec["seeds"]) >= 3
            if size == "gpu":  # the study's budget; ver5 trained 10 epochs there
                for p in planned:
                    assert p.config["train"]["batch_size"] == 16
                    assert p.config["train"]["epochs"] == (10 if p.name.startswith("ver5") else 100)
    versions = {p.name: p.config for p in plan_runs(load_pipeline(PIPELINES / "versions.yaml", "cpu"),
                                                     repo_root_of(PIPELINES / "versions.yaml"))}
    assert [versions[v]["model"]["name"] for v in sorted(versions)] == \
        ["unet", "unet", "unet_spconv", "unet_ra", "unet_mcnet"]
    assert versions["ver1"]["augment"] == {} and versions["ver2"]["augment"]["rotate"]["prob"] > 0
    assert len({str(cfg["train"]) + str(cfg["data"]) + str(cfg["model"]["features"])
                for cfg in versions.values()}) == 1  # one budget
    gpu = {p.name: p.config for p in plan_runs(load_pipeline(PIPELINES / "versions.yaml", "gpu"),
                                                repo_root_of(PIPELINES / "versions.yaml"))}
    assert gpu["ver5_thesis"]["model"]["variant"] == "thesis" and "variant" not in gpu["ver5"]["model"]


def test_unknown_pipeline_size_or_setting_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no experiment pipeline"):
        find_pipeline("no_such_experiment")
    with pytest.raises(ConfigError, match="no size"):
        load_pipeline(PIPELINES / "versions.yaml", "huge")
    cases = {
        "sweeps: [{param: epochs, values: [1]}]\n": "sweep param",
        "seeds: [0, 0]\nruns: [{name: a}]\n": "seeds",
        "folds: 1\nruns: [{name: a}]\n": "folds",
        "baseline: b\nruns: [{name: a}]\n": "baseline",
        "runs: [{name: a}]\nconditions: [{name: x, noise_hu: 1, noise_fraction: 0.1}]\n": "condition",
        "runs: [{name: a}, {name: b, overrides: {split.seed: 3}}]\n": "split",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            run_experiment(bad, size="cpu", runs_root=tmp_path)
