"""Runs that die lose nothing: SIGKILL mid-epoch then `--resume`, NaN losses, unwritable or full
output locations, an unavailable MLflow store. Real training on a tiny phantom, on CPU."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ctseg.cli import main
from ctseg.data import discover_cases
from ctseg.data.cache import cache_cases
from ctseg.data.phantom import write_phantom_dataset
from ctseg.train import train
from ctseg.config import resolve_config
from ctseg.train.loop import MAX_BAD_BATCHES
from ctseg.train.tracking import HTTP_LIMITS

REPO = Path(__file__).resolve().parents[1]


def tiny_config(root: Path, **train) -> dict:
    return {
        "data": {"size": [32, 32], "cache_dir": str(root / "cache")},
        "split": {"seed": 0, "val_fraction": 0.34},
        "model": {"name": "unet", "features": [4, 8]},
        "optim": {"lr": 0.01},
        "train": {"epochs": 3, "batch_size": 8, "seed": 5, "early_stopping": None, **train},
        "augment": {"rotate": {"prob": 0.5, "degrees": 10}, "flip": {"prob": 0.5},
                    "noise": {"prob": 0.5, "std": 0.02}},
        "infer": {"batch_size": 8},
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("faults"), n_cases=3, seed=2, rows=40,
                                 cols=40, slices=8)


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _outcome(run: Path) -> tuple[dict, list[dict]]:
    """metrics.json and history.csv without the wall-clock columns."""
    metrics = json.loads((run / "metrics.json").read_text())
    clock = {"train_seconds", "slices_per_second", "epoch_seconds"}
    return ({k: v for k, v in metrics.items() if k not in clock},
            [{k: v for k, v in row.items() if k not in clock} for row in _history(run)])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(cases, tmp_path):
    config = tiny_config(tmp_path, epochs=2, slices_per_epoch=64)  # 8 batches an epoch
    straight = train(config, cases, tmp_path / "straight", device="cpu")
    # Kill a tenth of an epoch after epoch 1's files are complete: inside epoch 2 even when the
    # killed run goes several times faster than the straight one did (a shared CI machine).
    delay = float(_history(straight)[1]["epoch_seconds"]) / 10

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ctseg.cli", "train", "--config", str(config_file),
                             "--case-dir", str(cases), "--output", str(killed), "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (killed / "metrics.json").exists():  # the last of epoch 1's files (after last.pt)
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    died_after = torch.load(last, weights_only=True)["epoch"]
    assert died_after == 1 and len(_history(killed)) == 1  # killed inside epoch 2
    assert not list(killed.rglob("*.tmp"))  # no half-written file left behind

    assert main(["train", "--resume", str(killed), "--device", "cpu"]) == 0
    assert _outcome(killed) == _outcome(straight)


def _poison_cached_images(cache: Path, slices) -> int:
    """A corrupted cache: NaN written into `slices` of every cached training image."""
    paths = sorted(cache.rglob("image.npy"))
    for path in paths:
        image = np.load(path)
        image[slices] = np.nan
        np.save(path, image)
    return len(paths)


def test_nan_batches_are_skipped_with_a_warning(cases, tmp_path, caplog):
    config = tiny_config(tmp_path, epochs=2, batch_size=4, slices_per_epoch=16)
    cache_cases(discover_cases(cases), resolve_config(config), tmp_path / "cache")
    assert _poison_cached_images(tmp_path / "cache", [3]) == 3  # one slice of each case
    with caplog.at_level(logging.WARNING, logger="ctseg.train.loop"):
        run = train(config, cases, tmp_path / "run", device="cpu")
    skipped = [r.getMessage() for r in caplog.records if "skipped a batch" in r.getMessage()]
    assert skipped and all("loss nan" in m for m in skipped)
    assert all(math.isfinite(float(row["train_loss"])) for row in _history(run))
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_repeated_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(cases, tmp_path, capsys):
    config = tiny_config(tmp_path, epochs=1, slices_per_epoch=48)  # 6 batches an epoch
    run = train(config, cases, tmp_path / "run", device="cpu")
    saved = {name: (run / "checkpoints" / name).read_bytes() for name in ("best.pt", "last.pt")}
    _poison_cached_images(tmp_path / "cache", slice(None))  # every training slice is NaN now
    assert main(["train", "--resume", str(run), "--device", "cpu", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert (f"training stopped in epoch 2: {MAX_BAD_BATCHES} batches in a row had a NaN or infinite "
            f"loss; {run / 'checkpoints' / 'last.pt'} (epoch 1) is the last good state") in err
    for name, data in saved.items():
        assert (run / "checkpoints" / name).read_bytes() == data, f"{name} changed"
    assert len(_history(run)) == 1


# --------------------------------------------------------------------------- output location

def _refused_before_reading(cases: Path, tmp_path: Path, output: Path, capsys, message: str) -> None:
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path, epochs=1)))
    assert main(["train", "--config", str(config_file), "--case-dir", str(cases),
                 "--output", str(output), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "cache").exists()  # refused before any case was read


def test_output_inside_a_file_is_refused_before_training(cases, tmp_path, capsys):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    _refused_before_reading(cases, tmp_path, tmp_path / "runs" / "r1", capsys,
                            "the output folder cannot be written (Not a directory)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the mode")
def test_output_without_write_permission_is_refused_before_training(cases, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    _refused_before_reading(cases, tmp_path, locked / "r1", capsys,
                            "the output folder cannot be written (Permission denied)")


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 4 MB tmpfs (needs mount rights, e.g. root in a container); skipped elsewhere."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_read_only_output_location_is_refused_before_training(cases, tmp_path, small_filesystem, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_filesystem)], check=True)
    _refused_before_reading(cases, tmp_path, small_filesystem / "r1", capsys,
                            "the output folder cannot be written (Read-only file system)")


@pytest.mark.parametrize("left, message", [
    (0, "the output folder cannot be written (No space left on device)"),
    (2**20, "MB free, but the checkpoints and QC images need about"),
])
def test_full_output_location_is_refused_before_training(cases, tmp_path, small_filesystem, capsys,
                                                         left, message):
    with open(small_filesystem / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:  # fill it up, as other jobs would
            f.write(b"\0" * 2**16)
            f.flush()
    if left:
        with open(small_filesystem / "filler", "r+b") as f:
            f.truncate((small_filesystem / "filler").stat().st_size - left)
    _refused_before_reading(cases, tmp_path, small_filesystem / "r1", capsys, message)


# --------------------------------------------------------------------------- tracking

def test_unreachable_mlflow_server_does_not_stop_training(cases, tmp_path, caplog, monkeypatch):
    """The first failed call disables tracking, within ctseg's HTTP bounds: with MLflow's own
    retry defaults it held training for about four minutes. 60 s is generous (the tiny run takes
    a few seconds; a loaded machine may take several times that) and still far below four minutes."""
    for name in HTTP_LIMITS:  # ctseg's bounds, not whatever this environment sets
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny_config(tmp_path, epochs=1)
    config["tracking"] = {"enabled": True, "uri": f"http://127.0.0.1:{port}"}
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ctseg.train.tracking"):
        run = train(config, cases, tmp_path / "run", device="cpu")
    assert time.monotonic() - start < 60
    warnings = [r.getMessage() for r in caplog.records if r.name == "ctseg.train.tracking"]
    assert len(warnings) == 1 and "training goes on" in warnings[0]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    assert len(_history(run)) == 1 and (run / "checkpoints" / "best.pt").is_file()
