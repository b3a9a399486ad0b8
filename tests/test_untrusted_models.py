"""Models passed around are data, not code: a model file or bundle that would run code when
unpickled or evaluated is refused (nothing runs) unless the user passes `--trust-bundle`.

Every attack below would create a marker file if it ran; the tests check it never appears.
That `--trust-bundle` does let a bundle's expressions run is shown in tests/test_bundle.py.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from infer_helpers import tiny_run

from ctseg.cli import main

REPO = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker file proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "bundle"
    assert main(["export-bundle", str(run_dir), "--output", str(out)]) == 0
    return out


def test_every_torch_load_in_ctseg_is_weights_only():
    """Static check of the source: each torch.load passes weights_only=True, and nothing else
    that unpickles or runs serialized code (pickle, torch.jit.load, np.load with pickles) is used."""
    calls = 0
    for path in sorted((REPO / "ctseg").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            name = f"{owner}.{node.func.attr}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "torch.load":
                calls += 1
                flag = keywords.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
            assert name not in ("pickle.load", "pickle.loads", "torch.jit.load", "dill.load"), \
                f"{path}:{node.lineno}: {name}"
            if name == "np.load":
                flag = keywords.get("allow_pickle")
                assert flag is None or (isinstance(flag, ast.Constant) and flag.value is False), \
                    f"{path}:{node.lineno}: np.load with pickles"
    assert calls >= 2  # checkpoints and bundle weights


def _poison(path: Path, marker: Path) -> None:
    """Replace a torch file by one whose unpickling runs code."""
    torch.save({"model": _Payload(marker), "network": {"name": "unet"}}, path)


def test_malicious_checkpoint_is_refused_everywhere(run_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil_run = tmp_path / "run"
    shutil.copytree(run_dir, evil_run)
    for name in ("best.pt", "last.pt"):
        _poison(evil_run / "checkpoints" / name, marker)
    commands = [
        ["predict", "--model", str(evil_run), "--input", str(tmp_path), "--output", str(tmp_path / "p")],
        ["predict", "--model", str(evil_run / "checkpoints" / "best.pt"), "--input", str(tmp_path),
         "--output", str(tmp_path / "p")],
        ["train", "--resume", str(evil_run), "--device", "cpu"],
        ["export-bundle", str(evil_run), "--output", str(tmp_path / "b")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and "WeightsUnpickler" in err, (argv, err)
        assert not marker.exists(), f"code ran during {argv}"


def test_malicious_bundle_weights_are_refused(bundle, phantom_dir, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "bundle"
    shutil.copytree(bundle, evil)
    _poison(evil / "models" / "model.pt", marker)
    for trust in ([], ["--trust-bundle"]):  # the weights are never unpickled with code, trusted or not
        assert main(["predict", "--model", str(evil), "--input", str(phantom_dir / "Images" / "Phantom_000"),
                     "--output", str(tmp_path / "out"), *trust]) == 2
        assert "not loadable with weights_only=True" in capsys.readouterr().err
        assert not marker.exists()


def _edit_bundle(bundle: Path, dest: Path, edit) -> Path:
    shutil.copytree(bundle, dest)
    path = dest / "configs" / "inference.yaml"
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _expression(marker: Path) -> str:
    return f"$open({str(marker)!r}, 'w').close() or [-1000, 400]"


@pytest.mark.parametrize("attack, refusal", [
    ("expression in ctseg_config", "evaluated only with --trust-bundle"),
    ("foreign network _target_", "without --trust-bundle only 'ctseg.networks.build_network' is built"),
    ("expression in network_def", "evaluated only with --trust-bundle"),
    ("nested _target_ in network_def", "'_target_' is only accepted with --trust-bundle"),
])
def test_bundle_config_code_never_runs_without_trust(bundle, phantom_dir, tmp_path, capsys, attack, refusal):
    marker = tmp_path / "pwned"

    def edit(config: dict) -> None:
        if attack == "expression in ctseg_config":
            config["ctseg_config"]["data"]["window"] = _expression(marker)
        elif attack == "foreign network _target_":
            config["network_def"] = {"_target_": "torch.nn.Sequential",
                                     "_requires_": _expression(marker)}
        elif attack == "expression in network_def":
            config["network_def"]["features"] = _expression(marker)
        else:
            config["network_def"]["kwargs"] = {"act": {"_target_": "builtins.open",
                                                       "file": str(marker), "mode": "w"}}

    evil = _edit_bundle(bundle, tmp_path / "bundle", edit)
    series = phantom_dir / "Images" / "Phantom_000"
    assert main(["predict", "--model", str(evil), "--input", str(series), "--output", str(tmp_path / "out")]) == 2
    assert refusal in capsys.readouterr().err
    assert not marker.exists()


def test_unused_bundle_entries_are_never_evaluated(bundle, phantom_dir, tmp_path):
    """The untrusted path reads only network_def and ctseg_config, as data: the template's own
    `$` entries (device, initialize, run) and any added ones stay text."""
    marker = tmp_path / "pwned"
    evil = _edit_bundle(bundle, tmp_path / "bundle", lambda c: c.update(
        device=_expression(marker), initialize=[_expression(marker)], run=[_expression(marker)]))
    out = tmp_path / "out"
    assert main(["predict", "--model", str(evil), "--input", str(phantom_dir / "Images" / "Phantom_000"),
                 "--output", str(out)]) == 0
    assert (out / "Phantom_000.nii.gz").is_file() and not marker.exists()
