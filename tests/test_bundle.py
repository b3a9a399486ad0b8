"""The MONAI bundle: export, `monai.bundle run` equal to `ctseg predict`, its own code, its metadata."""

from __future__ import annotations

import contextlib
import importlib
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
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out

from ctseg.cli import main
from ctseg.errors import CTSegError, ModelError
from ctseg.infer.export import REQUIRED_PACKAGES, TEMPLATE_DIR, export_bundle
from ctseg.infer.model_loader import load_model

from infer_helpers import tiny_run

CASES = ("Phantom_000", "Phantom_001", "Phantom_002")
REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "bundles" / "schema" / "meta_schema_20240725.json"


@contextlib.contextmanager
def bundle_scripts(bundle: Path):
    """The bundle's own `scripts` package, imported as `monai.bundle run` imports it."""
    sys.path.insert(0, str(bundle))
    try:
        yield importlib.import_module("scripts.transforms")
    finally:
        sys.path.remove(str(bundle))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]


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
    for name in ("configs/metadata.json", "configs/inference.yaml", "configs/train.yaml", "configs/evaluate.yaml",
                 "configs/logging.conf", "docs/README.md", "docs/data_license.txt", "LICENSE", "large_files.yml",
                 "models/model.pt", "models/model.ts", "models/model.pt2", "scripts/__init__.py",
                 "scripts/transforms.py", "scripts/networks/registry.py", "scripts/io/dicom.py"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "network_data_format"):
        assert meta[key], key
    assert meta["monai_version"] == __import__("monai").__version__
    assert set(meta["required_packages_version"]) == set(REQUIRED_PACKAGES)
    assert "ctseg" not in meta["required_packages_version"]
    assert "unknown" not in meta["required_packages_version"].values()
    assert meta["schema"].endswith("meta_schema_20240725.json")
    assert meta["version"] == "0.1.1" and list(meta["changelog"]) == ["0.1.1", "0.1.0"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["format"] == "hounsfield" and image["modality"] == "CT" and image["spatial_shape"] == [32, 32]
    assert meta["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
    # the tiny run's split lists every phantom case (train and val): none is held out, and no mean
    # may pass off training or checkpoint-picking cases as held out
    figures = meta["eval_metrics"]
    assert "held_out_mean_dice" not in figures and "mean_dice" not in figures
    assert 0 < figures["val_dice_selection_biased"] <= 1
    assert "selection-biased" in meta["eval_metrics_method"]["val_dice_selection_biased"]
    config = yaml.safe_load((bundle / "configs/inference.yaml").read_text())
    assert config["bundle_root"] == "."
    assert config["network_def"] == {"_target_": "scripts.networks.build_network", "name": "unet",
                                     "in_channels": 1, "out_channels": 1, "features": [8, 16]}
    assert config["ctseg_config"]["data"]["size"] == [32, 32]
    assert config["ctseg_config"]["data"]["case_dir"] is None  # no local path leaves the run
    assert config["ctseg_config"]["data"]["cache_dir"] is None
    steps = {s["_target_"]: s for s in config["preprocessing"]["transforms"]}
    assert (steps["ScaleIntensityRanged"]["a_min"], steps["ScaleIntensityRanged"]["a_max"]) == (-1000, 400)
    assert steps["Resized"]["spatial_size"] == [32, 32] and steps["scripts.transforms.StackContextd"]["context"] == 1
    assert config["inferer"]["_target_"] == "SliceInferer" and config["inferer"]["roi_size"] == [32, 32]
    assert "ctseg." not in (bundle / "configs/inference.yaml").read_text().replace("ctseg_config", "")
    large = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert {f["path"] for f in large} == {"models/model.pt", "models/model.ts", "models/model.pt2"}
    card = (bundle / "docs/README.md").read_text()
    assert "Not exported yet" not in card and f"`{run_dir.name}`" in card
    assert all(f"| {case} |" in card for case in CASES)
    assert "None of these cases is held out" in card and "held-out mean" not in card
    state = torch.load(bundle / "models/model.pt", weights_only=True)
    assert set(state) == set(load_model(run_dir, "cpu").model.state_dict())
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_card_and_metadata_report_held_out_cases_only_and_the_cv_figures(run_dir, tmp_path, capsys):
    """held_out_* average only the case the run never loaded; --cv copies `ctseg cv`'s summary.json."""
    from conftest import PHANTOM_SHAPE

    from ctseg.data.phantom import write_phantom_dataset
    from ctseg.evaluate.evaluate import evaluate_predictions
    from ctseg.study.cv import _write_outputs

    # the run's three cases (deterministic per index) plus Phantom_003, which the run never loaded
    slices, rows_, cols = PHANTOM_SHAPE
    cases = write_phantom_dataset(tmp_path / "cases", n_cases=4, seed=0, rows=rows_, cols=cols, slices=slices)
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    rows = [{"fold": k, "case": case, "dice": dice, "iou": dice - 0.05, "hd95_mm": 2.0 + k, "assd_mm": 0.5,
             "nsd": 0.9, "selection": "last", "epochs": 1, "train_seconds": 1.0}
            for k, (case, dice) in enumerate(zip(CASES, (0.91, 0.85, 0.88)))]
    _write_outputs(cv_dir, {}, [{"fold": k, "test": [c]} for k, c in enumerate(CASES)], rows, [])
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", str(run_dir), "--output", str(bundle), "--evaluate", str(cases),
                 "--cv", str(cv_dir)]) == 0
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    verify_metadata(meta_file=str(bundle / "configs/metadata.json"), filepath=str(SCHEMA))
    figures, method = meta["eval_metrics"], meta["eval_metrics_method"]

    # the same model's masks (ctseg predict), rescored by ctseg evaluate grouped by the run's split
    assert main(["predict", "--model", str(run_dir), "--input", str(cases), "--output", str(tmp_path / "pred")]) == 0
    scored = evaluate_predictions(tmp_path / "pred", cases, tmp_path / "eval", run=run_dir)
    assert scored["held_out"]["cases"] == ["Phantom_003"]
    assert figures["held_out_cases"] == 1 and "mean_dice" not in figures
    assert figures["held_out_mean_dice"] == pytest.approx(scored["held_out"]["metrics"]["dice"]["mean"], abs=6e-5)
    assert "Phantom_003" in method["held_out_mean_dice"] and "Phantom_000" not in method["held_out_mean_dice"]

    cv = json.loads((cv_dir / "summary.json").read_text())["metrics"]["dice"]
    assert figures["cv_mean_dice"] == round(cv["mean"], 4) == round((0.91 + 0.85 + 0.88) / 3, 4)
    assert figures["cv_sd_dice"] == round(cv["sd"], 4) and figures["cv_worst_dice"] == 0.85
    assert figures["cv_folds"] == 3 and figures["cv_cases"] == 3
    assert "never loaded" in method["cv_mean_dice"] and "leave-one-case-out" in method["cv_mean_dice"]
    card = (bundle / "docs/README.md").read_text()
    assert "### Cross-validation" in card and "(`Phantom_001`, fold 1)" in card
    assert f"mean {round(cv['mean'], 4):.4f}" in card
    assert "| held-out mean (1) |" in card and "| Phantom_003 | held out (not in the split) |" in card
    split = json.loads((run_dir / "split.json").read_text())
    assert all(f"| {c} | trained on |" in card for c in split["train"])
    assert all(f"| {c} | validation (picked the checkpoint) |" in card for c in split["val"])

    capsys.readouterr()
    assert main(["export-bundle", str(run_dir), "--output", str(tmp_path / "b2"), "--cv", str(cases)]) == 2
    assert "summary.json: missing or unreadable" in capsys.readouterr().err
    (cases / "summary.json").write_text(json.dumps({"cases": 3, "metrics": {"dice": {"mean": 0.9}}}))
    assert main(["export-bundle", str(run_dir), "--output", str(tmp_path / "b2"), "--cv", str(cases)]) == 2
    assert "not a `ctseg cv` summary" in capsys.readouterr().err
    assert not (tmp_path / "b2").exists()


def test_monai_verifies_the_network_against_the_metadata(bundle):
    with bundle_scripts(bundle):
        verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs/metadata.json"),
                          config_file=str(bundle / "configs/inference.yaml"), device="cpu")


def test_metadata_validates_against_the_vendored_20240725_schema(bundle, tmp_path):
    """MONAI's own check, offline: `filepath` names the schema copy, so nothing is downloaded."""
    for meta in (bundle / "configs/metadata.json", TEMPLATE_DIR / "configs/metadata.json"):
        verify_metadata(meta_file=str(meta), filepath=str(SCHEMA))
    broken = json.loads((bundle / "configs/metadata.json").read_text())
    del broken["required_packages_version"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="required_packages_version"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(SCHEMA))


def test_bundle_scripts_behave_like_ctseg(bundle, run_dir, phantom_dir):
    """The copies the bundle carries give ctseg's outputs on the same inputs."""
    from ctseg.data.dataset import stack_context
    from ctseg.infer.cases import find_inputs
    from ctseg.infer.postprocess import postprocess_labels, postprocess_steps
    from ctseg.io import load_series

    loaded = load_model(run_dir, "cpu")
    with bundle_scripts(bundle) as scripts:
        data = scripts.case_datalist(phantom_dir)
        assert data == [{"image": str(c.image), "case": c.name} for c in find_inputs(phantom_dir)]
        sample = scripts.LoadCTSeriesd(keys="image", label_key="label")(
            scripts.case_datalist(phantom_dir, labelled=True)[0])
        volume = load_series(data[0]["image"])
        np.testing.assert_array_equal(sample["image"][0].numpy().transpose(2, 1, 0), volume.array)
        np.testing.assert_array_equal(sample["image"].affine.numpy(), volume.affine)

        zyx = torch.rand(5, 6, 7, generator=torch.Generator().manual_seed(0))
        for k in (1, 3):
            stacked = scripts.StackContextd("image", context=k)({"image": zyx})["image"]
            torch.testing.assert_close(stacked.permute(1, 0, 2, 3), stack_context(zyx, k), rtol=0, atol=0)

        rng = np.random.default_rng(0)
        labels = (rng.random((9, 20, 24)) > 0.6).astype(np.uint8)
        steps = postprocess_steps(loaded.config, 2)
        from monai import transforms as mt
        box = scripts.InForegroundBoxd("pred", [getattr(mt, name)(**kw) for name, kw in steps])
        ours = box({"pred": torch.from_numpy(np.ascontiguousarray(labels.transpose(2, 1, 0)))[None]})["pred"]
        np.testing.assert_array_equal(ours[0].numpy().transpose(2, 1, 0), postprocess_labels(labels, steps))

        net = importlib.import_module("scripts.networks").build_network(
            **{k: v for k, v in yaml.safe_load((bundle / "configs/inference.yaml").read_text())["network_def"].items()
               if k != "_target_"})
        net.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True))
        x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(x), loaded.model(x), rtol=0, atol=0)


def test_ctseg_predict_on_the_bundle_writes_the_masks_of_the_run(bundle, phantom_dir, predicted, tmp_path):
    out = tmp_path / "predict_bundle"
    assert main(["predict", "--model", str(bundle), "--input", str(phantom_dir), "--output", str(out)]) == 0
    _same_masks(out, predicted)


def test_python_m_monai_bundle_run_writes_the_masks_of_ctseg_predict(bundle, phantom_dir, predicted, tmp_path):
    """The literal command line, from another working directory (`--bundle_root`), with MLflow."""
    out = tmp_path / "masks"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.yaml"),
         "--bundle_root", str(bundle), "--dataset_dir", str(phantom_dir), "--output_dir", str(out),
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


def test_export_never_replaces_a_folder_without_overwrite_and_keeps_other_files(run_dir, bundle, tmp_path):
    unrelated = tmp_path / "thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(CTSegError, match="not a MONAI bundle"):
            export_bundle(run_dir, unrelated, overwrite=overwrite)
    assert [p.name for p in unrelated.iterdir()] == ["chapter1.tex"]

    again = tmp_path / "again"
    shutil.copytree(bundle, again)
    (again / "eval").mkdir()
    (again / "eval" / "Phantom_000.nii.gz").write_bytes(b"an earlier result")
    (again / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in again.rglob("*") if p.is_file()}
    assert main(["export-bundle", str(run_dir), "--output", str(again)]) == 2  # refused, nothing touched
    assert {p: p.read_bytes() for p in again.rglob("*") if p.is_file()} == before

    assert main(["export-bundle", str(run_dir), "--output", str(again), "--overwrite"]) == 0
    assert (again / "eval" / "Phantom_000.nii.gz").read_bytes() == b"an earlier result"
    assert (again / "notes.txt").read_text() == "mine"
    meta = json.loads((again / "configs/metadata.json").read_text())
    assert meta["version"] == "0.1.2" and list(meta["changelog"]) == ["0.1.2", "0.1.1", "0.1.0"]
    assert (again / "models/model.pt").read_bytes() == (bundle / "models/model.pt").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_export_never_writes_into_the_template(run_dir):
    for target in (TEMPLATE_DIR, TEMPLATE_DIR / "models", TEMPLATE_DIR.parent / "other"):
        with pytest.raises(CTSegError, match="template"):
            export_bundle(run_dir, target, overwrite=True)
    assert not (TEMPLATE_DIR / "models").exists() and not (TEMPLATE_DIR.parent / "other").exists()


def test_committed_bundle_is_a_complete_template_without_weights():
    assert TEMPLATE_DIR == REPO / "bundles" / "lung_ct_segmentation"
    parser = ConfigParser()
    parser.read_config(str(TEMPLATE_DIR / "configs/inference.yaml"))
    parser.read_meta(str(TEMPLATE_DIR / "configs/metadata.json"))
    for key in ("network_def", "ctseg_config", "inferer", "postprocessing", "evaluator", "handlers",
                "checkpointloader", "initialize", "run"):
        assert key in parser, key
    assert parser["network_def"]["_target_"] == "scripts.networks.build_network"
    assert parser["bundle_root"] == "."
    train = yaml.safe_load((TEMPLATE_DIR / "configs/train.yaml").read_text())
    assert train["train"]["trainer"]["_target_"] == "SupervisedTrainer"
    # no measured figures: they belong to weights that are not in git
    assert json.loads((TEMPLATE_DIR / "configs/metadata.json").read_text())["eval_metrics"] == {}
    card = (TEMPLATE_DIR / "docs/README.md").read_text()
    assert "<!-- ctseg-export:start -->" in card and "<!-- ctseg-export:end -->" in card
    section = card.split("<!-- ctseg-export:start -->")[1].split("<!-- ctseg-export:end -->")[0]
    assert not any(ch.isdigit() for ch in section) and "|" not in section
    assert not (TEMPLATE_DIR / "scripts").exists()  # the export writes the code, from ctseg's source
    ignored = subprocess.run(["git", "check-ignore", "-q", "bundles/lung_ct_segmentation/models/model.pt"],
                             cwd=REPO, capture_output=True)
    assert ignored.returncode == 0


def test_network_def_passes_every_network_argument_through():
    from ctseg.infer.export import network_def

    spec = {"name": "unet_ra", "in_channels": 3, "out_channels": 1, "features": [8, 16],
            "variant": "thesis", "kwargs": {"attention_ratio": 0.5}}
    assert network_def(spec) == {"_target_": "scripts.networks.build_network", "name": "unet_ra",
                                 "in_channels": 3, "out_channels": 1, "features": [8, 16],
                                 "variant": "thesis", "attention_ratio": 0.5}


def test_bundle_scripts_refuse_code_needing_more_than_the_bundle_requires(monkeypatch):
    from ctseg.infer import export

    monkeypatch.setattr(export, "SCRIPT_ROOTS", (*export.SCRIPT_ROOTS, "ctseg.config"))  # ctseg.config.files imports yaml
    with pytest.raises(ModelError, match=r"ctseg\.config(\.files)? imports yaml"):
        export.bundle_scripts()


def test_a_2_5d_bundle_writes_the_masks_of_ctseg_predict(phantom_dir, tmp_path):
    """Context stacking (3 slices per input) through the bundle's transforms and SliceInferer."""
    from ctseg.train import train

    from infer_helpers import TINY_CONFIG, run_bundle_inference

    config = {**TINY_CONFIG, "data": {"size": [32, 32], "context": 3, "cache_dir": str(tmp_path / "cache")},
              "train": {**TINY_CONFIG["train"], "epochs": 2}}
    run = train(config, phantom_dir, tmp_path / "run", device="cpu")
    bundle, expected, out = tmp_path / "bundle", tmp_path / "expected", tmp_path / "masks"
    assert main(["export-bundle", str(run), "--output", str(bundle)]) == 0
    assert main(["predict", "--model", str(run), "--input", str(phantom_dir), "--output", str(expected)]) == 0
    run_bundle_inference(bundle, phantom_dir, out)
    _same_masks(out, expected)
    assert sum(np.count_nonzero(nib.load(out / f"{c}.nii.gz").dataobj) for c in CASES) > 0
