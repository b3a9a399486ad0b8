"""`ctseg predict`: geometry identical to `ctseg convert`, inputs of every kind, failures per case."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ctseg.cli import main
from ctseg.config import apply_overrides
from ctseg.errors import ConfigError, CTSegError, ModelError
from ctseg.infer.cases import inference_config, output_path
from ctseg.infer.model_loader import load_model
from ctseg.infer.postprocess import postprocess_labels, postprocess_steps
from ctseg.io import load_mask, load_series

from infer_helpers import tiny_run

CASES = ("Phantom_000", "Phantom_001", "Phantom_002")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


@pytest.fixture(scope="module")
def predicted(run_dir, phantom_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred")
    assert main(["predict", "--model", str(run_dir), "--input", str(phantom_dir), "--output", str(out),
                 "--device", "cpu"]) == 0
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_masks_have_exactly_the_geometry_of_ctseg_convert(predicted, phantom_dir, tmp_path):
    for case in CASES:
        converted = tmp_path / f"{case}_ct.nii.gz"
        assert main(["convert", str(phantom_dir / "Images" / case), str(converted)]) == 0
        ct, mask = nib.load(converted), nib.load(predicted / f"{case}.nii.gz")
        assert mask.shape == ct.shape
        assert mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(mask.affine, ct.affine)
        for form in ("get_sform", "get_qform"):
            matrix, code = getattr(mask.header, form)(coded=True)
            ct_matrix, ct_code = getattr(ct.header, form)(coded=True)
            assert code == ct_code == 1
            np.testing.assert_allclose(matrix, ct_matrix, atol=1e-5)
        assert mask.header.get_zooms() == ct.header.get_zooms()


def test_masks_line_up_with_the_truth_and_csv_reports_each_case(predicted, phantom_dir):
    rows = {r["case"]: r for r in _read_csv(predicted / "predictions.csv")}
    assert set(rows) == set(CASES)
    for case in CASES:
        volume = load_series(phantom_dir / "Images" / case)
        truth = load_mask(phantom_dir / "Segmentations" / f"{case}_seg.npz", volume)
        labels = np.asarray(nib.load(predicted / f"{case}.nii.gz").dataobj).transpose(2, 1, 0)
        assert set(np.unique(labels)) <= {0, 1}
        dice = 2 * np.sum((labels > 0) & (truth > 0)) / (np.sum(labels > 0) + np.sum(truth > 0))
        assert dice > 0.5, f"{case}: Dice {dice:.3f}"
        row = rows[case]
        assert row["status"] == "ok" and row["error"] == ""
        assert int(row["slices"]) == volume.shape[0]
        assert float(row["seconds"]) > 0 and float(row["slices_per_second"]) > 0
        expected_ml = np.count_nonzero(labels) * np.prod(volume.spacing) / 1000
        assert float(row["foreground_ml"]) == pytest.approx(expected_ml, abs=0.01)


def test_series_folder_and_nifti_inputs_give_the_same_mask(run_dir, phantom_dir, predicted, tmp_path):
    case = "Phantom_001"  # stored in descending slice order
    nifti = tmp_path / f"{case}.nii.gz"
    assert main(["convert", str(phantom_dir / "Images" / case), str(nifti)]) == 0
    for source, out in ((phantom_dir / "Images" / case, tmp_path / "from_series"), (nifti, tmp_path / "from_nifti")):
        assert main(["predict", "--model", str(run_dir), "--input", str(source), "--output", str(out),
                     "--device", "cpu"]) == 0
        assert [p.name for p in sorted(out.glob("*.nii.gz"))] == [f"{case}.nii.gz"]
        got, want = nib.load(out / f"{case}.nii.gz"), nib.load(predicted / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
        np.testing.assert_allclose(got.affine, want.affine, atol=1e-6)


def test_a_failing_case_does_not_stop_the_others(run_dir, phantom_dir, tmp_path, capsys):
    cases = tmp_path / "cases"
    shutil.copytree(phantom_dir / "Images" / "Phantom_000", cases / "good")
    shutil.copytree(phantom_dir / "Images" / "Phantom_002", cases / "broken")
    victim = sorted((cases / "broken").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated pixel data
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run_dir), "--input", str(cases), "--output", str(out)]) == 1
    rows = {r["case"]: r for r in _read_csv(out / "predictions.csv")}
    assert rows["good"]["status"] == "ok" and (out / "good.nii.gz").is_file()
    assert rows["broken"]["status"] == "failed" and not (out / "broken.nii.gz").exists()
    assert victim.name in rows["broken"]["error"]
    err = capsys.readouterr().err
    assert "broken" in err and "1 case(s) failed" in err


def test_case_names_cannot_write_outside_the_output_folder(run_dir, phantom_dir, tmp_path):
    for bad in ("..", ".", "", "a/b", "..\\x"):
        with pytest.raises(CTSegError):
            output_path(tmp_path, bad)
    assert output_path(tmp_path, "Case_001") == (tmp_path / "Case_001.nii.gz").resolve()
    source = tmp_path / "src"
    source.mkdir()
    assert main(["convert", str(phantom_dir / "Images" / "Phantom_000"), str(source / "..nii.gz")]) == 0
    out = tmp_path / "deep" / "out"
    assert main(["predict", "--model", str(run_dir), "--input", str(source / "..nii.gz"),
                 "--output", str(out)]) == 1
    assert [r["status"] for r in _read_csv(out / "predictions.csv")] == ["failed"]
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["out"]


def test_probabilities_without_postprocessing_threshold_to_the_labels(run_dir, phantom_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run_dir), "--input", str(phantom_dir / "Images" / "Phantom_002"),
                 "--output", str(out), "--probabilities", "--no-postprocess"]) == 0
    labels = nib.load(out / "Phantom_002.nii.gz")
    probs = nib.load(out / "probabilities" / "Phantom_002.nii.gz")
    assert probs.get_data_dtype() == np.float32 and probs.shape == labels.shape
    np.testing.assert_array_equal(probs.affine, labels.affine)
    p = np.asarray(probs.dataobj)
    assert 0.0 <= p.min() and p.max() <= 1.0
    np.testing.assert_array_equal(np.asarray(labels.dataobj), (p >= 0.5).astype(np.uint8))


def test_flip_tta_runs_and_follows_the_training_flips(run_dir, phantom_dir, tmp_path):
    config = {"augment": {"flip": {"prob": 0.5, "axes": [0, 1]}}, "infer": {"tta": []}}
    assert inference_config(config, True)["infer"]["tta"] == [0, 1]
    assert inference_config({}, True)["infer"]["tta"] == [1]
    assert inference_config({"infer": {"tta": [1]}}, False)["infer"]["tta"] == []
    assert inference_config(config, None) == config
    out = tmp_path / "out"
    assert main(["predict", "--model", str(run_dir), "--input", str(phantom_dir / "Images" / "Phantom_000"),
                 "--output", str(out), "--tta"]) == 0
    assert np.count_nonzero(np.asarray(nib.load(out / "Phantom_000.nii.gz").dataobj)) > 0


def test_postprocessing_keeps_the_two_largest_components_and_fills_holes():
    labels = np.zeros((12, 24, 24), np.uint8)
    labels[2:10, 2:10, 2:10] = 1          # left lung with an enclosed hole
    labels[5:7, 5:7, 5:7] = 0
    labels[2:10, 2:10, 14:22] = 1         # right lung
    labels[0, 20, 0] = 1                  # a speck of noise
    steps = postprocess_steps({}, num_classes=2)
    assert [name for name, _ in steps] == ["KeepLargestConnectedComponent", "FillHoles"]
    out = postprocess_labels(labels, steps)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    assert out[0, 20, 0] == 0 and out[6, 6, 6] == 1
    assert np.count_nonzero(out) == 2 * 8**3
    assert postprocess_steps({"infer": {"postprocess": {"enabled": False}}}, 2) == []
    assert postprocess_steps({"infer": {"postprocess": False}}, 2) == []
    single = postprocess_steps({"infer": {"postprocess": {"keep_largest": 1, "fill_holes": False}}}, 2)
    kept = postprocess_labels(labels, single)  # the lung without a hole is the larger one
    assert np.count_nonzero(kept) == 8**3 and kept[6, 6, 18] == 1 and kept[3, 3, 3] == 0
    with pytest.raises(ConfigError):
        postprocess_steps({"infer": {"postprocess": {"largest": 2}}}, 2)


@pytest.mark.parametrize("seed", range(6))
def test_postprocessing_in_the_foreground_box_equals_the_whole_volume(seed):
    from monai import transforms as mt
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((14, 20, 24)), 1.2)
    labels = np.digitize(field, np.quantile(field, [0.55, 0.8])).astype(np.uint8)  # 0, 1, 2
    if seed % 2 == 0:  # foreground away from the volume border: a real box
        labels[:2], labels[:, -3:], labels[..., :4] = 0, 0, 0
    num_classes, keep = (3, {1: 1, 2: 2}) if seed % 3 else (2, 2)
    labels = np.minimum(labels, num_classes - 1)
    interior = ndimage.binary_erosion(labels == 1, iterations=2)
    labels[interior & (rng.random(labels.shape) < 0.2)] = 0  # enclosed holes to fill
    for connectivity in (None, 1):
        config = {"infer": {"postprocess": {"keep_largest": keep, "connectivity": connectivity}}}
        steps = postprocess_steps(config, num_classes)
        volume = torch.from_numpy(np.ascontiguousarray(labels.transpose(2, 1, 0)))[None]
        whole = mt.Compose([getattr(mt, name)(**kw) for name, kw in steps])(volume.clone())
        boxed = postprocess_labels(labels, steps)
        np.testing.assert_array_equal(boxed, np.asarray(whole)[0].transpose(2, 1, 0))


def _altered_checkpoint(run_dir: Path, path: Path, *overrides: str) -> Path:
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    state["config"] = apply_overrides(state["config"], overrides)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("override, message", [("data.context=3", "input channel"),
                                               ("data.num_classes=3", "output channel")])
def test_model_and_config_mismatch_is_a_clear_error(run_dir, phantom_dir, tmp_path, capsys, override, message):
    checkpoint = _altered_checkpoint(run_dir, tmp_path / "altered.pt", override)
    with pytest.raises(ModelError, match=message):
        load_model(checkpoint, device="cpu")
    assert main(["predict", "--model", str(checkpoint), "--input", str(phantom_dir),
                 "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_unloadable_models_and_inputs_are_refused(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither a run folder"):
        load_model(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["predict", "--model", str(run_dir), "--input", str(text), "--output", str(tmp_path / "o")]) == 2
    assert "NIfTI" in capsys.readouterr().err
