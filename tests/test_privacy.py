"""No patient identifier leaves the DICOM headers, and case names cannot write outside an output.

A phantom is written with PatientName `SECRET^NAME`, PatientID `SECRET-ID` and known study
dates; a short real training (`ctseg train`), prediction and evaluation run on it through the
CLI with every log record and console line captured to files. Then every byte they
produced is searched, gzip and zip members (NIfTI, checkpoints, caches) decompressed first.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import zipfile
from pathlib import Path

import pydicom
import pytest
import yaml

from ctseg.cli import main
from ctseg.data.phantom import write_phantom_dataset
from ctseg.io import load_series, save_nifti

PATIENT_NAME, PATIENT_ID = "SECRET^NAME", "SECRET-ID"
TINY = {
    "data": {"size": [32, 32]},
    "model": {"name": "unet", "features": [4, 8]},
    "split": {"seed": 0, "val_fraction": 0.34},
    "train": {"epochs": 2, "batch_size": 8, "early_stopping": None},
    "infer": {"batch_size": 8},
    "tracking": {"experiment": "privacy"},
}


def _run(argv: list[str], console: Path) -> int:
    """`ctseg ARGV` in-process, its stdout and stderr appended to `console`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    with open(console, "a") as f:
        f.write(f"$ ctseg {' '.join(argv)}\n{out.getvalue()}")
    return code


@pytest.fixture(scope="module")
def produced(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("privacy")
    cases = write_phantom_dataset(root / "input", n_cases=3, seed=4, rows=40, cols=40, slices=8,
                                  patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
    out = root / "out"
    (out / "logs").mkdir(parents=True)
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "cache_dir": str(out / "cache")}}))
    handler = logging.FileHandler(out / "logs" / "all.log")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    console = out / "logs" / "console.txt"
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("MLFLOW_TRACKING_URI", raising=False)  # default store: out/runs/mlflow.db
            env.chdir(out)  # anything written relative to the working folder lands in `out`
            run = out / "runs" / "tiny"
            assert _run(["-v", "train", "--config", str(config), "--case-dir", str(cases),
                         "--output", str(run)], console) == 0
            assert _run(["-v", "predict", "--model", str(run), "--input", str(cases),
                         "--output", str(out / "pred"), "--probabilities"], console) == 0
            assert _run(["-v", "evaluate", "--pred", str(out / "pred"), "--truth", str(cases),
                         "--output", str(out / "eval"), "--split", str(run / "split.json")],
                        console) == 0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
    dates = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyDate)
             for f in (cases / "Images").rglob("*.dcm")}
    return {"root": root, "cases": cases, "out": out, "run": run, "dates": dates}


def _contents(path: Path):
    """The file's bytes, plus the decompressed bytes of gzip files and every zip member."""
    data = path.read_bytes()
    yield str(path), data
    if data[:2] == b"\x1f\x8b":
        yield f"{path} (gunzipped)", gzip.decompress(data)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                yield f"{path}!{member}", archive.read(member)


def test_the_input_really_holds_the_identifiers(produced):
    header = pydicom.dcmread(next((produced["cases"] / "Images").rglob("*.dcm")))
    assert str(header.PatientName) == PATIENT_NAME and header.PatientID == PATIENT_ID
    assert len(produced["dates"]) == 3


def test_no_identifier_in_any_byte_produced(produced):
    out = produced["out"]
    secrets = [b"SECRET"]  # both identifiers; MLflow's own schema has a lower-case "secret"
    for date in produced["dates"]:
        secrets += [date.encode(), f"{date[:4]}-{date[4:6]}-{date[6:]}".encode(),
                    f"{date[6:]}.{date[4:6]}.{date[:4]}".encode()]
    kinds: dict[str, int] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        assert not any(s.decode() in name for s in secrets), f"identifier in file name {name}"
        for where, data in _contents(path):
            for secret in secrets:
                assert secret not in data, f"{secret!r} found in {where}"
        kinds[path.name.split(".", 1)[-1]] = kinds.get(path.name.split(".", 1)[-1], 0) + 1
    # everything the pipeline writes was searched: MLflow store and artifacts, run folder,
    # checkpoints, cache, predictions (labels and probabilities), evaluation, logs
    assert (out / "runs" / "mlflow.db").is_file() and any((out / "runs" / "mlartifacts").rglob("*.png"))
    for kind in ("db", "pt", "nii.gz", "csv", "json", "md", "png", "yaml", "log", "txt"):
        assert kinds.get(kind), f"no .{kind} file was produced to search ({sorted(kinds)})"
    log = (out / "logs" / "all.log").read_text()
    assert "ctseg.train" in log and "ctseg.infer" in log  # the capture did see the run


def test_nifti_headers_carry_no_identifying_text(produced):
    import nibabel as nib

    masks = sorted((produced["out"] / "pred").rglob("*.nii.gz"))
    assert masks
    for path in masks:
        header = nib.load(path).header
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            assert not bytes(header[field].tobytes()).strip(b"\0 "), f"{path}: {field} is set"
        assert header.extensions == [] or not any(b"SECRET" in e.get_content() for e in header.extensions)


def test_case_names_cannot_leave_the_output_folder_in_predict_and_evaluate(produced, tmp_path):
    """A NIfTI case file named `...nii.gz` is a case called `..`: prediction refuses that one case
    and writes the others; evaluation scores it without writing anything outside its folder.
    (Path separators cannot occur in a name read from disk; `ctseg.infer.predict.output_path`
    refuses them and `..` for any caller: tests/test_predict.py.)"""
    cases = tmp_path / "cases"
    cases.mkdir()
    volume = load_series(produced["cases"] / "Images" / "Phantom_000")
    for name in ("..", "ok"):
        save_nifti(volume.array, volume.affine, cases / f"{name}.nii.gz")
        save_nifti((volume.array > -500).astype("uint8"), volume.affine, cases / f"{name}_seg.nii.gz")
    before = sorted(tmp_path.parent.iterdir())
    pred = tmp_path / "sandbox" / "pred"
    console = tmp_path / "console.txt"
    assert _run(["predict", "--model", str(produced["run"]), "--input", str(cases),
                 "--output", str(pred)], console) == 1
    assert "..: FAILED" in console.read_text() and "cannot be used as a file name" in console.read_text()
    assert sorted(p.name for p in pred.iterdir()) == [".ctseg-manifest.json", ".ctseg.lock", "ok.nii.gz",
                                                      "predictions.csv"]
    # a prediction for `..` placed by hand: evaluation must keep every output inside its folder
    os.link(pred / "ok.nii.gz", pred / "...nii.gz")
    evaluation = tmp_path / "sandbox" / "eval"
    assert _run(["evaluate", "--pred", str(pred), "--truth", str(cases), "--output", str(evaluation)],
                console) == 0
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["eval", "pred"]
    assert sorted(tmp_path.parent.iterdir()) == before
    for path in evaluation.rglob("*"):
        assert path.resolve().is_relative_to(evaluation.resolve())
