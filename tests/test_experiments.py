"""Each study experiment pipeline end to end at its `smoke` size (tiny phantom, one epoch)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ctseg.cli import main
from ctseg.errors import ConfigError
from ctseg.study.experiments import find_pipeline, load_pipeline, plan_runs, repo_root_of, run_experiment

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines" / "experiments"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, monkeypatch_module) -> Path:
    """One MLflow store and preprocessing cache for the module (the store's set-up costs seconds)."""
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


def _table(doc: Path) -> list[list[str]]:
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


@pytest.mark.parametrize("name, runs, conditions", [
    ("versions", ["ver1", "ver2", "ver3", "ver4", "ver5"], 1),
    ("noise", ["train_clean", "train_noisy"], 3),
    ("train_size", ["train_slices_2", "train_slices_4", "train_cases_1"], 1),
])
def test_experiment_smoke(name, runs, conditions, runs_root, tmp_path):
    output = tmp_path / "runs"
    assert main(["experiment", name, "--size", "smoke", "--runs-root", str(runs_root),
                 "--output", str(output)]) == 0

    doc = output / f"{name}.md"  # smoke results stay beside the runs, never in docs/
    table = _table(doc)
    assert [row[0] for row in table] == [r for r in runs for _ in range(conditions)]
    for row in table:
        assert 0.0 <= float(row[8]) <= 1.0  # volume Dice
    for link in re.findall(r"\]\(([^)]+\.png)\)", doc.read_text()):
        assert (output / link).stat().st_size > 1000
    with open(output / "results.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(runs) * conditions
    for run in runs:
        assert (output / run / "checkpoints" / "best.pt").is_file()

    tracked = _mlflow_runs(runs_root, name)
    assert sorted(r.info.run_name for r in tracked) == sorted(runs)
    for r in tracked:
        assert "eval_clean_dice" in r.data.metrics
        assert r.data.tags["experiment.pipeline"] == name

    if name == "train_size":
        slices = {row[0]: int(row[4]) for row in table}
        assert slices["train_slices_2"] == 2 and slices["train_slices_4"] == 4


def test_pipelines_plan_every_size():
    for path in sorted(PIPELINES.glob("*.yaml")):
        for size in ("smoke", "cpu", "gpu"):
            spec = load_pipeline(path, size)
            planned = plan_runs(spec, repo_root_of(path))
            assert planned and all(p.config["tracking"]["experiment"] == f"ctseg-{path.stem}" for p in planned)
    versions = {p.name: p.config for p in plan_runs(load_pipeline(PIPELINES / "versions.yaml", "cpu"),
                                                     repo_root_of(PIPELINES / "versions.yaml"))}
    assert [versions[v]["model"]["name"] for v in sorted(versions)] == \
        ["unet", "unet", "unet_spconv", "unet_ra", "unet_mcnet"]
    assert versions["ver1"]["augment"] == {} and versions["ver2"]["augment"]["rotate"]["prob"] > 0
    assert len({str(cfg["train"]) + str(cfg["data"]) + str(cfg["model"]["features"])
                for cfg in versions.values()}) == 1  # one budget


def test_unknown_pipeline_or_size_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no experiment pipeline"):
        find_pipeline("no_such_experiment")
    with pytest.raises(ConfigError, match="no size"):
        load_pipeline(PIPELINES / "versions.yaml", "huge")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweeps: [{param: epochs, values: [1]}]\n")
    with pytest.raises(ConfigError, match="sweep param"):
        run_experiment(bad, size="cpu", runs_root=tmp_path)
