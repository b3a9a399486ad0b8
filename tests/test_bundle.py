"""The MONAI bundle: export, `monai.bundle run` equal to `ctseg predict`, programs without ctseg."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser, verify_net_in_out

from ctseg.cli import main
from ctseg.errors import CTSegError, ModelError
from ctseg.infer.export import TEMPLATE_DIR, export_bundle
from ctseg.infer.model_loader import load_model

from infer_helpers import tiny_run

CASES = ("Phantom_000", "Phantom_001", "Phantom_002")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


@pytest.fixture(scope="module")
def bundle(run_dir, phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "lung_ct_segmentation"
    assert main(["export-bundle", str(run_dir), "--output", str(out), "--evaluate", str(phantom_dir)]) == 0
    return out


@pytest.fixture(scope="module")
def predicted(run_dir, phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred")
    assert main(["predict", "--model", str(run_dir), "--input", str(phantom_dir), "--output", str(out)]) == 0
    return out


def _same_masks(a: Path, b: Path, cases=CASES) -> None:
    for case in cases:
        x, y = nib.load(a / f"{case}.nii.gz"), nib.load(b / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj), err_msg=case)
        np.testing.assert_array_equal(x.affine, y.affine)
        assert x.get_data_dtype() == y.get_data_dtype() == np.uint8
        assert (a / f"{case}.nii.gz").read_bytes() == (b / f"{case}.nii.gz").read_bytes()


def test_bundle_follows_the_monai_layout(bundle, run_dir):
    for name in ("configs/metadata.json", "configs/inference.yaml", "configs/logging.conf", "docs/README.md",
                 "docs/data_license.txt", "LICENSE", "models/model.pt", "models/model.ts", "models/model.pt2"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "network_data_format"):
        assert meta[key], key
    assert meta["monai_version"] == __import__("monai").__version__
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["format"] == "hounsfield" and image["modality"] == "CT" and image["spatial_shape"] == [32, 32]
    assert meta["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
    assert 0 < meta["eval_metrics"]["held_out_mean_dice"] <= 1
    config = yaml.safe_load((bundle / "configs/inference.yaml").read_text())
    assert config["network_def"] == {"_target_": "ctseg.networks.build_network", "name": "unet",
                                     "in_channels": 1, "out_channels": 1, "features": [8, 16]}
    assert config["ctseg_config"]["data"]["size"] == [32, 32]
    assert "case_dir" not in config["ctseg_config"]["data"]
    card = (bundle / "docs/README.md").read_text()
    assert "Not exported yet" not in card and f"`{run_dir.name}`" in card
    assert all(f"| {case} |" in card for case in CASES)
    state = torch.load(bundle / "models/model.pt", weights_only=True)
    assert set(state) == set(load_model(run_dir, "cpu").model.state_dict())
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_monai_verifies_the_network_against_the_metadata(bundle):
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
                      config_file=str(bundle / "configs/inference.yaml"), device="cpu")


def test_ctseg_predict_on_the_bundle_writes_the_masks_of_the_run(bundle, phantom_dir, predicted, tmp_path):
    out = tmp_path / "predict_bundle"
    assert main(["predict", "--model", str(bundle), "--input", str(phantom_dir), "--output", str(out)]) == 0
    _same_masks(out, predicted)


def test_python_m_monai_bundle_run_writes_the_masks_of_ctseg_predict(bundle, phantom_dir, predicted, tmp_path):
    """The literal command line, from another working directory, with MONAI's MLflow switch."""
    out = tmp_path / "masks"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.yaml"),
         "--dataset_dir", str(phantom_dir), "--output_dir", str(out),
         "--tracking", "mlflow", "--save_execute_config", str(out / "executed_config.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _same_masks(out, predicted)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("lung_ct_segmentation")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["executed_config.json"]


def test_exported_programs_run_with_torch_alone(bundle, run_dir, tmp_path):
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
x = torch.load({str(tmp_path / 'x.pt')!r})
extra = {{"metadata.json": ""}}
program = torch.export.load({str(bundle / 'models/model.pt2')!r}, extra_files=extra).module()
traced = torch.jit.load({str(bundle / 'models/model.ts')!r})
with torch.no_grad():
    torch.save({{"pt2": program(x), "ts": traced(x)}}, {str(tmp_path / 'y.pt')!r})
assert '"network_data_format"' in extra["metadata.json"]
loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("ctseg", "monai"))
assert not loaded, loaded
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = torch.load(tmp_path / "y.pt", weights_only=True)
    with torch.no_grad():
        expected = load_model(run_dir, "cpu").model(x)
    torch.testing.assert_close(outputs["pt2"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["ts"], expected, rtol=1e-4, atol=1e-5)


def test_untrusted_bundle_configs_are_read_without_running_them(bundle, tmp_path):
    def edited(name: str, edit) -> Path:
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        config = yaml.safe_load((copy / "configs/inference.yaml").read_text())
        edit(config)
        (copy / "configs/inference.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return copy

    foreign = edited("foreign", lambda c: c["network_def"].update({"_target_": "monai.networks.nets.BasicUNet"}))
    with pytest.raises(ModelError, match="--trust-bundle"):
        load_model(foreign, "cpu")
    marker = tmp_path / "ran"
    expression = edited("expression", lambda c: c["ctseg_config"]["data"].update(
        {"size": f"$open({str(marker)!r}, 'w') and [32, 32]"}))
    with pytest.raises(ModelError, match="expression or reference"):
        load_model(expression, "cpu")
    assert not marker.exists()
    trusted = load_model(expression, "cpu", trust_bundle=True)  # the user vouched for it: it runs
    assert marker.exists() and trusted.config["data"]["size"] == [32, 32]
    shutil.rmtree(expression / "models")
    with pytest.raises(ModelError, match="no weights"):
        load_model(expression, "cpu")


def test_export_replaces_a_bundle_but_never_an_unrelated_folder(run_dir, bundle, tmp_path):
    unrelated = tmp_path / "thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("precious")
    with pytest.raises(CTSegError, match="not a MONAI bundle"):
        export_bundle(run_dir, unrelated)
    assert (unrelated / "chapter1.tex").read_text() == "precious"
    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    (again / "eval").mkdir()
    assert export_bundle(run_dir, again) == again
    assert not (again / "eval").exists() and (again / "models/model.pt2").is_file()
    assert (again / "configs/inference.yaml").read_text() == (bundle / "configs/inference.yaml").read_text()


def test_committed_bundle_is_a_complete_template_without_weights():
    assert TEMPLATE_DIR == REPO / "bundles" / "lung_ct_segmentation"
    parser = ConfigParser()
    parser.read_config(str(TEMPLATE_DIR / "configs/inference.yaml"))
    parser.read_meta(str(TEMPLATE_DIR / "configs/metadata.json"))
    for key in ("network_def", "ctseg_config", "inferer", "postprocessing", "evaluator", "handlers",
                "checkpointloader", "initialize", "run"):
        assert key in parser, key
    assert parser["network_def"]["_target_"] == "ctseg.networks.build_network"
    card = (TEMPLATE_DIR / "docs/README.md").read_text()
    assert "<!-- ctseg-export:start -->" in card and "<!-- ctseg-export:end -->" in card
    ignored = subprocess.run(["git", "check-ignore", "-q", "bundles/lung_ct_segmentation/models/model.pt"],
                             cwd=REPO, capture_output=True)
    assert ignored.returncode == 0
