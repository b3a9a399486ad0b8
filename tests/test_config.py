"""One schema checks every config, wherever it comes from (issue 17: D6, D8, D9, D13).

Each refusal is reproduced through the CLI with real files: a YAML config on disk, `key=value`
overrides, a trained run's checkpoint, an exported bundle. Every one must end in exit code 2 with
one message naming the key, and leave nothing in the output folder.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from infer_helpers import tiny_run

from ctseg.cli import main
from ctseg.config import (apply_overrides, config_view, known_keys, load_config, read_yaml,
                          resolve_config, schema_defaults)
from ctseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

SMALL = {"data": {"size": [32, 32]}, "model": {"name": "unet", "features": [4, 8]},
         "train": {"epochs": 1, "batch_size": 8}, "tracking": {"enabled": False}}


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({**SMALL, "data": {**SMALL["data"], "cache_dir": str(tmp_path / "cache")}}))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


# --------------------------------------------------------------------------- the schema itself
def test_every_shipped_pipeline_config_passes_the_schema():
    paths = sorted((REPO / "pipelines").glob("*.yaml"))
    assert len(paths) >= 7
    for path in paths:
        resolved = resolve_config(load_config(path), str(path))
        assert resolved["train"]["epochs"] >= 1, path


def test_defaults_are_stated_once_and_fill_what_a_config_omits():
    defaults = schema_defaults()
    assert defaults["train"]["epochs"] == 50 and defaults["infer"]["amp"] is True
    resolved = resolve_config({"train": {"epochs": 3}})
    assert resolved["train"]["epochs"] == 3
    assert resolved["train"]["batch_size"] == defaults["train"]["batch_size"]
    assert resolved["infer"]["postprocess"] == defaults["infer"]["postprocess"]
    assert resolve_config({"infer": {"postprocess": False}})["infer"]["postprocess"]["enabled"] is False


def test_typed_view_is_read_only_and_typed():
    cfg = config_view({"train": {"epochs": 7}, "augment": {"rotate": {"prob": 0.3}}})
    assert cfg.train.epochs == 7 and cfg.augment.rotate.degrees == 10.0 and cfg.augment.flip is None
    assert cfg.size == (256, 256)
    with pytest.raises(AttributeError):
        cfg.train.epochs = 8  # type: ignore[misc]


@pytest.mark.parametrize("config, message", [
    ({"trian": {"epochs": 3}}, "unknown key 'trian.epochs'; did you mean 'train.epochs'?"),
    ({"train": {"epcohs": 3}}, "unknown key 'train.epcohs'; did you mean 'train.epochs'?"),
    ({"augment": {"rotate": {"degree": 3}}}, "did you mean 'augment.rotate.degrees'?"),
    ({"train": {"epochs": "abc"}}, "train.epochs must be an integer"),
    ({"train": {"epochs": 10**9}}, "train.epochs must be an integer in [1, 100000], got 1000000000"),
    ({"train": {"epochs": True}}, "train.epochs must be an integer"),
    ({"optim": {"lr": "abc"}}, "optim.lr must be a number"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be an integer in [1, 4096], got 0"),
    ({"infer": {"threshold": math.nan}}, "infer.threshold must be a number in [0, 1], got nan"),
    ({"data": {"size": [6000, 6000]}}, "data.size must be"),
    ({"infer": {"tta": [1] * 200}}, "infer.tta must be a list of 0 to 2 items"),
    ({"data": {"window": [400, -1000]}}, "data.window must have low < high"),
    ({"data": {"context": 2}}, "data.context must be odd"),
    ({"train": []}, "'train' must be a mapping"),
])
def test_bad_settings_are_refused_naming_the_key(config, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(config, "my.yaml")
    assert str(info.value).startswith("my.yaml: ") and message in str(info.value)


def test_known_keys_cover_every_setting_ctseg_documents():
    keys = set(known_keys())
    for key in ("train.epochs", "infer.amp", "infer.postprocess.keep_largest", "augment.noise.std_hu",
                "data.window", "split.folds", "optim.momentum", "tracking.uri"):
        assert key in keys


# --------------------------------------------------------------------------- YAML caps (D6)
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


def test_alias_bomb_is_refused_while_composing(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert path.stat().st_size < 1024  # 10**9 values once expanded
    with pytest.raises(ConfigError, match="aliases"):
        load_config(path)


@pytest.mark.parametrize("text", ["[" * 20_000 + "]" * 20_000,
                                  "".join(f"{' ' * i}k:\n" for i in range(1_000)) + " " * 1_000 + "k: 1\n"],
                         ids=["flow", "block"])
def test_deep_nesting_is_a_config_error_not_a_recursion_error(text):
    with pytest.raises(ConfigError, match="nesting deeper than 32"):
        read_yaml(text, "deep.yaml")


def test_recursive_alias_and_oversized_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="recursive alias"):
        read_yaml("a: &a [1, *a]\n", "loop.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="at most"):
        load_config(big)


def test_aliases_a_person_would_write_still_load():
    data = read_yaml("base: &b {prob: 0.2}\nrotate: *b\nscale: *b\n", "ok.yaml")
    assert data["rotate"] == data["scale"] == {"prob": 0.2}


# --------------------------------------------------------------------------- through the CLI (D8, D9)
def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctseg.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_typo_in_an_override_stops_train_before_anything_is_written(config_file, phantom_dir, tmp_path):
    out = tmp_path / "run"
    result = _cli("train", "--config", str(config_file), "--case-dir", str(phantom_dir), "--output",
                  str(out), "--device", "cpu", "trian.epochs=3")
    assert result.returncode == 2, result.stderr
    assert "unknown key 'trian.epochs'; did you mean 'train.epochs'?" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_alias_bomb_config_is_refused_by_train(phantom_dir, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    result = _cli("train", "--config", str(bomb), "--case-dir", str(phantom_dir), "--output",
                  str(tmp_path / "run"), "--device", "cpu")
    assert result.returncode == 2 and "aliases" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("train.epochs=abc", "train.epochs must be an integer"),
    ("train.epochs=1e9", "train.epochs must be an integer"),  # YAML 1.1 reads 1e9 as a string
    ("train.epochs=1.0e9", "train.epochs must be an integer"),
    ("optim.lr=abc", "optim.lr must be a number"),
    ("train.batch_size=0", "train.batch_size must be an integer in [1, 4096]"),
    ("data.size=[6000,6000]", "data.size must be"),
])
def test_bad_override_values_exit_2_and_write_nothing(config_file, phantom_dir, tmp_path, capsys,
                                                      override, message):
    out = tmp_path / "run"
    argv = ["train", "--config", str(config_file), "--case-dir", str(phantom_dir), "--output", str(out),
            "--device", "cpu", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and str(config_file) in err
    assert not out.exists()  # no config.yaml, no split.json


@pytest.mark.parametrize("device", ["bogus", "cuda", "mps", "cuda:7"])
def test_unavailable_device_is_a_clear_error(config_file, phantom_dir, tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > int(device.partition(":")[2] or 0):
        pytest.skip("this machine has that CUDA device")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config_file), "--case-dir", str(phantom_dir), "--output",
                 str(out), "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device}" in err or f"--device '{device}'" in err
    assert not out.exists()
    assert main(["predict", "--model", str(tmp_path), "--input", str(tmp_path), "--output",
                 str(tmp_path / "pred"), "--device", device]) == 2


# --------------------------------------------------------------------------- from a model (D6)
def _poisoned_run(run_dir: Path, tmp_path: Path, *overrides: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for name in ("best.pt", "last.pt"):
        path = run / "checkpoints" / name
        state = torch.load(path, weights_only=True)
        state["config"] = apply_overrides(state["config"], overrides)
        torch.save(state, path)
    return run


@pytest.mark.parametrize("override, message", [
    ("infer.threshold=.nan", "infer.threshold must be a number in [0, 1], got nan"),
    ("data.size=[6000,6000]", "data.size must be"),
    ("infer.tta=[" + ",".join(["1"] * 200) + "]", "infer.tta must be a list of 0 to 2 items"),
    ("infer.bogus=1", "unknown key 'infer.bogus'"),
])
def test_checkpoint_config_is_checked_before_predicting(run_dir, phantom_dir, tmp_path, capsys,
                                                         override, message):
    run = _poisoned_run(run_dir, tmp_path, override)
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run), "--input", str(phantom_dir / "Images"),
                 "--output", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and "best.pt" in err
    assert not out.exists() or not list(out.glob("*.nii.gz"))


def test_bundle_config_is_checked_and_yaml_capped(run_dir, phantom_dir, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", str(run_dir), "--output", str(bundle)]) == 0
    capsys.readouterr()
    config_path = bundle / "configs" / "inference.yaml"
    original = config_path.read_text()
    raw = yaml.safe_load(original)
    raw["ctseg_config"]["infer"]["threshold"] = math.nan
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    argv = ["predict", "--model", str(bundle), "--input", str(phantom_dir / "Images"), "--output",
            str(tmp_path / "pred"), "--device", "cpu"]
    assert main(argv) == 2
    assert "ctseg_config: infer.threshold must be a number in [0, 1], got nan" in capsys.readouterr().err

    config_path.write_text(BOMB + original)
    assert main(argv) == 2
    assert "aliases" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists() or not list((tmp_path / "pred").glob("*.nii.gz"))


# --------------------------------------------------------------------------- resume (D13)
def test_resume_refuses_changed_data_settings_and_names_them(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    assert main(["train", "--resume", str(run), "--device", "cpu", "data.window=[-500,500]",
                 "loss.lambda_ce=0.1", "train.epochs=9"]) == 2
    err = capsys.readouterr().err
    assert "--resume cannot change" in err and "data.window" in err and "loss.lambda_ce" in err
    assert "train.epochs (" not in err  # training length may change
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert yaml.safe_load((run / "config.yaml").read_text()) == yaml.safe_load(
        (run_dir / "config.yaml").read_text())


def test_resume_with_a_typo_is_refused(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["train", "--resume", str(run), "--device", "cpu", "train.epoch=9"]) == 2
    assert "did you mean 'train.epochs'?" in capsys.readouterr().err
