"""Distributed training and inference on CPU: 2 real processes (gloo) on a tiny phantom.

Training runs in two `torch.multiprocessing` processes given torchrun's environment (rank, world
size, a free localhost port); prediction runs through torchrun itself, as users start it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ctseg.data.phantom import write_phantom_dataset
from ctseg.distributed import ShardSampler, shard, unshard

CASES, SLICES = 4, 10
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path, epochs: int) -> dict:
    return {
        "data": {"size": [32, 32], "foreground_ratio": None, "cache_dir": str(root / "cache")},
        "split": {"seed": 0, "val_fraction": 0.5},
        "model": {"name": "unet", "features": [4, 8]},
        "optim": {"lr": 0.01},
        "train": {"epochs": epochs, "batch_size": 4, "seed": 1, "early_stopping": None},
        "augment": {"flip": {"prob": 0.5}},
        "infer": {"batch_size": 8},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "ctseg-dist"},
    }


def _train_worker(rank: int, world: int, ports: list[int], root: Path, cases: Path) -> None:
    """One rank: 1 epoch, then --resume to 2 epochs; records what it wrote, trained on and scored.

    Rank 1's first training slice is NaN: both ranks must skip that batch (or DDP would hang).
    """
    from ctseg.config import load_config
    from ctseg.data.dataset import SliceDataset
    from ctseg.errors import ConfigError
    from ctseg import distributed
    from ctseg.train import loop, train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1")
    record = {"writes": [], "slices": [], "val_dice": [], "skipped": 0}
    save, write_text = loop.save_checkpoint, loop.atomic_write_text
    loop.save_checkpoint = lambda path, state: record["writes"].append(Path(path).name) or save(path, state)
    loop.atomic_write_text = lambda path, text: record["writes"].append(Path(path).name) or write_text(path, text)
    getitem, validate = SliceDataset.__getitem__, loop._Trainer._validate

    def spy_getitem(self, i):
        sample = getitem(self, i)
        record["slices"].append([sample["case"], int(sample["slice"])])
        if rank == 1 and len(record["slices"]) == 1:
            sample["image"] = sample["image"] * float("nan")
        return sample

    def spy_validate(self, *args, **kwargs):
        val = validate(self, *args, **kwargs)
        record["val_dice"].append(val["dice"])
        return val

    def spy_skip(self, *args, **kwargs):
        record["skipped"] += 1
        return skip(self, *args, **kwargs)

    skip = loop._Trainer._skip_batch
    SliceDataset.__getitem__, loop._Trainer._validate = spy_getitem, spy_validate
    loop._Trainer._skip_batch = spy_skip

    os.environ["MASTER_PORT"] = str(ports[0])
    train(_config(root, epochs=1), cases, root / "run", device="cpu")
    os.environ["MASTER_PORT"] = str(ports[1])
    train(load_config(root / "run" / "config.yaml", ["train.epochs=2"]), resume=root / "run", device="cpu")

    os.environ["MASTER_PORT"] = str(ports[2])
    with distributed.session("cpu") as device:
        try:
            distributed.sync_batchnorm(torch.nn.BatchNorm2d(2), device)
        except ConfigError as exc:
            record["sync_bn_cpu"] = str(exc)
    (root / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    cases = write_phantom_dataset(root / "phantom", n_cases=CASES, seed=2, rows=48, cols=48, slices=SLICES)
    workers = mp.spawn(_train_worker, args=(WORLD, [_free_port() for _ in range(3)], root, cases),
                       nprocs=WORLD, join=False)
    deadline = time.monotonic() + 600
    while not workers.join(timeout=5):  # raises when a worker fails
        if time.monotonic() > deadline:  # a collective waiting for its peer would block forever
            for process in workers.processes:
                process.kill()
            pytest.fail("distributed training did not finish within 10 minutes (a hang?)")
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return {"root": root, "cases": cases, "run": root / "run", "ranks": ranks}


@pytest.mark.slow
def test_training_completes_and_resumes_under_two_processes(dist_run):
    run = dist_run["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    with open(run / "history.csv", newline="") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    for name in ("config.yaml", "split.json", "checkpoints/best.pt", "checkpoints/last.pt", "qc/best.png"):
        assert (run / name).is_file(), name
    from ctseg.infer.model_loader import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 2
    assert not any(k.startswith("module.") for k in state["model"])  # the bare model, not DDP's wrapper


@pytest.mark.slow
def test_only_rank_0_writes_the_run_and_logs_to_mlflow(dist_run):
    rank0, rank1 = dist_run["ranks"]
    assert rank1["writes"] == []
    assert {"best.pt", "last.pt", "metrics.json", "history.csv"} <= set(rank0["writes"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{dist_run['root'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctseg-dist")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # one MLflow run, continued by the resume
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_dice")]
    assert sorted(steps) == [1, 2]


@pytest.mark.slow
def test_ranks_train_on_disjoint_shares_of_the_training_cases_only(dist_run):
    split = json.loads((dist_run["run"] / "split.json").read_text())
    assert len(split["val"]) == 2 and len(split["train"]) == 2
    all_train = {(case, z) for case in split["train"] for z in range(SLICES)}
    per_epoch = len(all_train) // WORLD
    shares = [[r["slices"][e * per_epoch:(e + 1) * per_epoch] for r in dist_run["ranks"]] for e in range(2)]
    for epoch in shares:
        sets = [{tuple(s) for s in share} for share in epoch]
        assert all(len(s) == per_epoch for s in sets)
        assert not sets[0] & sets[1]
        assert sets[0] | sets[1] == all_train  # no validation slice, every training slice once
    assert shares[0][0] != shares[1][0]  # reshuffled each epoch


@pytest.mark.slow
def test_every_rank_agrees_on_the_validation_dice(dist_run):
    rank0, rank1 = dist_run["ranks"]
    # Rank 0 also scores the best checkpoint alone at the end of each train() call.
    assert len(rank1["val_dice"]) == 2 and len(rank0["val_dice"]) == 4
    assert [rank0["val_dice"][0], rank0["val_dice"][2]] == rank1["val_dice"]
    metrics = json.loads((dist_run["run"] / "metrics.json").read_text())
    assert metrics["best_val_dice"] == pytest.approx(max(rank1["val_dice"]))


@pytest.mark.slow
def test_a_nan_batch_on_one_rank_is_skipped_by_both(dist_run):
    assert [r["skipped"] for r in dist_run["ranks"]] == [1, 1]
    from ctseg.infer.model_loader import load_checkpoint

    state = load_checkpoint(dist_run["run"] / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    with open(dist_run["run"] / "history.csv", newline="") as f:
        assert all(np.isfinite(float(row["train_loss"])) for row in csv.DictReader(f))


@pytest.mark.slow
def test_sync_bn_is_refused_on_cpu(dist_run):
    assert all("CUDA" in r["sync_bn_cpu"] for r in dist_run["ranks"])


def _torchrun_predict(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default for several processes
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "ctseg.cli", "predict", *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predictions_from_two_ranks_equal_those_from_one(dist_run, tmp_path):
    from ctseg.cli import main

    inputs = ["--model", str(dist_run["run"]), "--input", str(dist_run["cases"]), "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads as each torchrun process
    try:
        assert main(["predict", *inputs, "--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = _torchrun_predict([*inputs, "--output", str(tmp_path / "two")], WORLD)
    assert two.returncode == 0, two.stderr
    names = [f"Phantom_{i:03d}" for i in range(CASES)]
    for name in names:
        a = nib.load(tmp_path / "one" / f"{name}.nii.gz")
        b = nib.load(tmp_path / "two" / f"{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
    with open(tmp_path / "two" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == names and all(r["status"] == "ok" for r in rows)
    assert two.stdout.count("case(s) written") == 1  # one summary, from rank 0
    for name in names:  # each case segmented by exactly one rank
        assert two.stdout.count(f"{name}: ") == 1


def test_shard_sampler_splits_each_draw_into_equal_disjoint_shares():
    draw = list(range(7))  # an odd draw: padded by wrapping around, as DistributedSampler does
    shares = [list(ShardSampler(draw, num_replicas=3, replica=r)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3] == [len(ShardSampler(draw, 3, r)) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(draw + draw[:2])
    assert shares == [[0, 3, 6], [1, 4, 0], [2, 5, 1]]


def test_shard_and_unshard_are_inverse_without_a_group():
    items = list("abcdefg")
    assert shard(items) == items  # one process: everything
    parts = [items[r::3] for r in range(3)]
    assert unshard(parts) == items


@pytest.mark.slow
def test_make_train_with_nproc_trains_under_torchrun(tmp_path):
    """`make train NPROC=2` really starts two ranks that train one run (this interpreter's
    environment stands in for .venv: BIN and an up-to-date STAMP are passed to make)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than pyproject.toml and the lock: make installs nothing
    cases = write_phantom_dataset(tmp_path / "phantom", n_cases=CASES, seed=3, rows=32, cols=32, slices=6)
    config = _config(tmp_path, epochs=1)
    config["tracking"] = {"enabled": False}
    (tmp_path / "tiny.yaml").write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([make, "-C", str(repo), "train", "NPROC=2", f"BIN={Path(sys.executable).parent}",
                           f"STAMP={stamp}", f"CONFIG={tmp_path / 'tiny.yaml'}", f"CASE_DIR={cases}",
                           f"OUTPUT={tmp_path / 'run'}", "ARGS=--device cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torchrun" in done.stdout and "rank 0 of 2 (gloo)" in done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 1
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
