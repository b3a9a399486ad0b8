"""The budget schedule (`optim.schedule: cosine`) and the weights' moving average (`train.ema`),
on the curve itself and in real short trainings on the shared phantom."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from ctseg.cli import main
from ctseg.config import apply_overrides, load_config
from ctseg.infer.model_loader import load_checkpoint
from ctseg.train import train
from ctseg.train.schedule import budget_progress, cosine_lr

LR, MIN_LR, WARMUP = 0.01, 1e-4, 0.3


def _config(root: Path, overrides: list[str]) -> dict:
    config = {
        "data": {"size": [32, 32], "window": [-1000, 400], "foreground_ratio": 0.5,
                 "cache_dir": str(root / "cache")},
        "split": {"seed": 0, "val_fraction": 0.34},
        "model": {"name": "unet", "features": [4, 8]},
        "optim": {"lr": LR, "min_lr": MIN_LR, "warmup_fraction": WARMUP, "schedule": "cosine"},
        "train": {"epochs": 3, "batch_size": 8, "seed": 3},
        "augment": {"flip": {"prob": 0.5}},
        "infer": {"batch_size": 8},
        "tracking": {"enabled": False},
    }
    return apply_overrides(config, overrides)


def _lrs(run: Path) -> list[float]:
    with open(run / "history.csv", newline="") as f:
        return [float(row["lr"]) for row in csv.DictReader(f)]


def test_cosine_lr_warms_up_linearly_then_decays_to_min_lr():
    def at(p: float) -> float:
        return cosine_lr(p, LR, MIN_LR, WARMUP)

    assert at(0.0) == pytest.approx(MIN_LR)
    assert at(WARMUP / 2) == pytest.approx((LR + MIN_LR) / 2)  # linear warm-up
    assert at(WARMUP / 4) == pytest.approx(MIN_LR + (LR - MIN_LR) / 4)
    assert at(WARMUP) == pytest.approx(LR)
    assert at((1 + WARMUP) / 2) == pytest.approx((LR + MIN_LR) / 2)  # cosine: half-way at mid-decay
    assert at(1.0) == pytest.approx(MIN_LR)
    assert at(1.5) == pytest.approx(MIN_LR)  # past the budget it stays at the end
    decay = [at(WARMUP + i * (1 - WARMUP) / 20) for i in range(21)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_budget_progress_is_the_larger_of_epochs_and_time():
    assert budget_progress(2, 5, 10, 4, elapsed_seconds=1.0, time_limit_seconds=None) == pytest.approx(0.375)
    assert budget_progress(2, 5, 10, 4, elapsed_seconds=80.0, time_limit_seconds=100.0) == pytest.approx(0.8)
    assert budget_progress(2, 5, 10, 4, elapsed_seconds=10.0, time_limit_seconds=100.0) == pytest.approx(0.375)
    assert budget_progress(1, 3, 10, 4, elapsed_seconds=500.0, time_limit_seconds=100.0) == 1.0
    assert budget_progress(4, 10, 10, 4, elapsed_seconds=0.0, time_limit_seconds=None) == 1.0


def test_cosine_run_follows_the_curve_and_ends_at_min_lr_on_its_last_epoch(phantom_dir, tmp_path):
    run = train(_config(tmp_path, ["train.early_stopping=1"]), phantom_dir, tmp_path / "run")
    lrs = _lrs(run)
    assert len(lrs) == 3  # early stopping is off with the cosine schedule
    for epoch, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(cosine_lr(epoch / 3, LR, MIN_LR, WARMUP), rel=1e-4), epoch
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-4)
    assert json.loads((run / "metrics.json").read_text())["schedule"] == "cosine"


def test_cosine_run_with_a_time_limit_ends_at_min_lr_when_the_time_runs_out(phantom_dir, tmp_path):
    """50 epochs asked, 0.06 s of budget: the time runs out in epoch 1 and the LR is at its end.
    (With the epochs alone the LR after epoch 1 would still be warming up.) The epoch is made long
    (500 steps) so the budget ends inside its training steps on a fast machine too, not during
    validation, after the last step."""
    config = _config(tmp_path, ["train.epochs=50", "train.time_limit_minutes=0.001",
                                "train.slices_per_epoch=4000"])
    run = train(config, phantom_dir, tmp_path / "run")
    lrs = _lrs(run)
    assert len(lrs) < 50
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-4)


def test_ema_weights_are_validated_saved_and_predict(phantom_dir, tmp_path, capsys):
    run = train(_config(tmp_path, ["train.ema=0.9", "train.epochs=2"]), phantom_dir, tmp_path / "run")
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["ema_updates"] > 0
    floats = [k for k, v in last["model"].items() if v.is_floating_point()]
    assert any(not torch.equal(last["model"][k], last["raw_model"][k]) for k in floats)
    assert any("running_mean" in k and not torch.equal(last["model"][k], last["raw_model"][k])
               for k in floats)  # BatchNorm statistics are averaged too
    assert main(["predict", "--model", str(run), "--input", str(phantom_dir),
                 "--output", str(tmp_path / "pred"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 3


class _Interrupt(logging.Handler):
    """Ctrl-C right after epoch 1's checkpoints are written (the epoch's log line follows them)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("epoch 1/"):
            raise KeyboardInterrupt


def test_resume_continues_the_schedule_and_the_average(phantom_dir, tmp_path, caplog):
    overrides = ["train.ema=0.8"]
    straight = train(_config(tmp_path, overrides), phantom_dir, tmp_path / "a")

    caplog.set_level(logging.INFO, logger="ctseg.train.loop")
    loop_logger = logging.getLogger("ctseg.train.loop")
    handler = _Interrupt()
    loop_logger.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_config(tmp_path, overrides), phantom_dir, tmp_path / "b")
    finally:
        loop_logger.removeHandler(handler)
    assert len(_lrs(tmp_path / "b")) == 1
    resumed = train(load_config(tmp_path / "b" / "config.yaml"), resume=tmp_path / "b")

    assert _lrs(resumed) == _lrs(straight)
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert a["ema_updates"] == b["ema_updates"]
    for weights in ("model", "raw_model"):
        for key in a[weights]:
            assert torch.equal(a[weights][key], b[weights][key]), (weights, key)


@pytest.mark.parametrize("override, message", [
    ("optim.schedule=linear", "optim.schedule must be one of ['plateau', 'cosine']"),
    ("optim.warmup_fraction=1.0", "optim.warmup_fraction must be"),
    ("train.ema=1.0", "train.ema must be a number in (0, 1) or null"),
    ("train.ema=0", "train.ema must be"),
])
def test_bad_schedule_or_ema_settings_are_refused(tmp_path, override, message):
    from ctseg.config import resolve_config
    from ctseg.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(_config(tmp_path, [override]))
