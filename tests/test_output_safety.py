"""Outputs never destroy inputs or users' files, failed cases are never scored, folders are shared
safely, and atomic writes survive crashes (issue 17: D1, D2, D9, D11, D14). Real DICOM, NIfTI, a
real trained run, the real CLI, and real processes killed mid-write."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctseg.cli import main
from ctseg.data import discover_cases
from ctseg.data.cache import load_case_volume
from ctseg.evaluate.evaluate import evaluate_predictions
from ctseg.infer.cases import CasePrediction, write_csv
from ctseg.io import load_mask, save_nifti
from ctseg.utils import atomic_path, atomic_write_text, csv_cell, csv_uncell, log_text

from infer_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {csv_uncell(r["case"]): r for r in csv.DictReader(fh)}


def _predict(run_dir: Path, source: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--model", str(run_dir), "--input", str(source), "--output", str(out),
                 "--device", "cpu", *extra])


def _convert(phantom_dir: Path, case: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    assert main(["convert", str(phantom_dir / "Images" / case), str(target)]) == 0
    return target


# --------------------------------------------------------------------------- D1: inputs and user files

def test_predict_refuses_to_overwrite_its_nifti_input(run_dir, phantom_dir, tmp_path, capsys):
    scan = _convert(phantom_dir, "Phantom_000", tmp_path / "data" / "scan.nii.gz")
    before = scan.read_bytes()
    for source in (scan, scan.parent):  # the file itself, or the folder holding it
        assert _predict(run_dir, source, scan.parent) == 2
        err = capsys.readouterr().err
        assert "would overwrite the input" in err and "scan.nii.gz" in err, err
        assert scan.read_bytes() == before
    assert sorted(p.name for p in scan.parent.iterdir() if not p.name.startswith(".")) == ["scan.nii.gz"]


def test_predict_never_replaces_a_file_ctseg_did_not_write(run_dir, phantom_dir, tmp_path, capsys):
    source = phantom_dir / "Images" / "Phantom_001"
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "Phantom_001.nii.gz"
    mine.write_bytes(b"the user's own file")
    assert _predict(run_dir, source, out) == 2
    assert "was not written by ctseg" in capsys.readouterr().err
    assert mine.read_bytes() == b"the user's own file" and not (out / "predictions.csv").exists()

    mine.unlink()
    assert _predict(run_dir, source, out) == 0
    assert _predict(run_dir, source, out) == 0  # its own, unchanged output: replaced freely
    corrected = nib.load(mine)
    labels = np.asarray(corrected.dataobj).copy()
    labels[labels.shape[0] // 2] = 0  # a correction made by hand, saved under the same name
    nib.save(nib.Nifti1Image(labels, corrected.affine), mine)
    edited = mine.read_bytes()
    assert _predict(run_dir, source, out) == 2
    assert "was not written by ctseg" in capsys.readouterr().err
    assert mine.read_bytes() == edited


# --------------------------------------------------------------------------- D2: failed cases

def test_rerun_with_a_failed_case_leaves_no_stale_mask_and_evaluate_skips_it(
        run_dir, phantom_dir, tmp_path, capsys):
    cases = tmp_path / "cases"
    shutil.copytree(phantom_dir, cases)
    out = tmp_path / "pred"
    assert _predict(run_dir, cases, out, "--probabilities") == 0
    assert (out / "Phantom_002.nii.gz").is_file() and (out / "probabilities" / "Phantom_002.nii.gz").is_file()
    victim = sorted((cases / "Images" / "Phantom_002").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated: this case now fails
    assert _predict(run_dir, cases, out, "--probabilities") == 1
    assert not (out / "Phantom_002.nii.gz").exists()
    assert not (out / "probabilities" / "Phantom_002.nii.gz").exists()
    rows = _rows(out / "predictions.csv")
    assert rows["Phantom_002"]["status"] == "failed" and rows["Phantom_000"]["status"] == "ok"
    capsys.readouterr()

    assert main(["evaluate", "--pred", str(out), "--truth", str(cases), "--output", str(tmp_path / "eval")]) == 0
    assert "failed in ctseg predict: Phantom_002" in capsys.readouterr().err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["failed_predictions"] == ["Phantom_002"]
    assert summary["cases_without_prediction"] == []
    assert set(_rows(tmp_path / "eval" / "cases.csv")) == {"Phantom_000", "Phantom_001"}


def test_evaluate_does_not_score_a_mask_the_table_says_failed(phantom_dir, tmp_path):
    pred = tmp_path / "pred"
    for case in discover_cases(phantom_dir):  # perfect masks for every case...
        volume = load_case_volume(case)
        save_nifti(load_mask(case.label, volume), volume.affine, pred / f"{case.name}.nii.gz", kind="label")
    write_csv([CasePrediction("Phantom_000", "ok"), CasePrediction("Phantom_001", "failed", error="DicomError: x"),
               CasePrediction("Phantom_002", "ok")], pred / "predictions.csv")  # ...but one case failed
    summary = evaluate_predictions(pred, phantom_dir, tmp_path / "eval")
    assert summary["cases"] == 2 and summary["failed_predictions"] == ["Phantom_001"]
    assert "Phantom_001" not in _rows(tmp_path / "eval" / "cases.csv")
    assert "failed in `ctseg predict` (not scored): Phantom_001" in (tmp_path / "eval" / "report.md").read_text()


# --------------------------------------------------------------------------- D3: classes

def _labelled_case(root: Path, truth: np.ndarray) -> None:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    case = root / "case_a"
    save_nifti(np.full(truth.shape, -500.0, np.float32), affine, case / "image.nii.gz", kind="image")
    save_nifti(truth, affine, case / "mask.nii.gz", kind="label")


def test_evaluate_scores_absent_classes_as_missing_and_refuses_foreign_labels(tmp_path, capsys):
    truth = np.zeros((4, 16, 16), np.uint8)
    truth[1:3, 2:6, 2:6] = 5
    pred = np.zeros_like(truth)
    pred[1:3, 9:13, 9:13] = 1  # no overlap at all
    _labelled_case(tmp_path / "truth", truth)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    save_nifti(pred, affine, tmp_path / "pred" / "case_a.nii.gz", kind="label")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--output", str(tmp_path / "eval")]) == 0
    assert "volume Dice mean 0.0000" in capsys.readouterr().out  # was 0.6000: 3 empty classes as 1
    row = _rows(tmp_path / "eval" / "cases.csv")["case_a"]
    assert row["dice_1"] == "0.0" and row["dice_5"] == "0.0" and row["dice_3"] == "nan"

    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--output", str(tmp_path / "eval2"), "--num-classes", "2"]) == 2
    err = capsys.readouterr().err
    assert "mask.nii.gz: truth labels [5] are outside the classes 0..1" in err, err
    save_nifti(pred * 7, affine, tmp_path / "pred" / "case_a.nii.gz", kind="label")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--output", str(tmp_path / "eval3")]) == 2
    err = capsys.readouterr().err
    assert "case_a.nii.gz: prediction labels [7] are outside the classes 0..5" in err, err


# --------------------------------------------------------------------------- D9: output locations

def _refused_output(argv: list[str], capsys, message: str) -> None:
    """Exit 2 with one line, before the model is loaded or any case is read."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ctseg.infer.model_loader.load_model", _no_work)
        mp.setattr("ctseg.data.cache.load_case_volume", _no_work)
        mp.setattr("ctseg.evaluate.evaluate.load_case_volume", _no_work)  # bound at import there
        assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == "", captured


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the output location was checked")


def _commands(phantom_dir: Path, run_dir: Path, tmp_path: Path, output: Path) -> list[list[str]]:
    pred = tmp_path / "some_pred"
    if not pred.exists():
        for case in discover_cases(phantom_dir):
            volume = load_case_volume(case)
            save_nifti(load_mask(case.label, volume), volume.affine, pred / f"{case.name}.nii.gz", kind="label")
    return [
        ["predict", "--model", str(run_dir), "--input", str(phantom_dir / "Images" / "Phantom_000"),
         "--output", str(output)],
        ["evaluate", "--pred", str(pred), "--truth", str(phantom_dir), "--output", str(output)],
    ]


def test_output_that_is_a_file_or_under_a_file_is_refused_before_work(run_dir, phantom_dir, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for argv in _commands(phantom_dir, run_dir, tmp_path, a_file):
        _refused_output(argv, capsys, "the output is an existing file, not a folder")
    for argv in _commands(phantom_dir, run_dir, tmp_path, a_file / "out"):
        _refused_output(argv, capsys, "the output folder cannot be written (Not a directory)")
    _refused_output(["convert", str(phantom_dir / "Images" / "Phantom_000"), str(a_file / "ct.nii.gz")],
                    capsys, "notes.txt is a file, not a folder")
    _refused_output(["convert", str(phantom_dir / "Images" / "Phantom_000"), str(tmp_path)],
                    capsys, "the output is an existing folder")
    assert a_file.read_text() == "keep me"


def _every_output_refused(phantom_dir, run_dir, tmp_path, folder, capsys, reason: str) -> None:
    """predict, evaluate and convert into `folder` are each refused with `reason`, before work."""
    for argv in _commands(phantom_dir, run_dir, tmp_path, folder / "out"):
        _refused_output(argv, capsys, f"the output folder cannot be written ({reason})")
    _refused_output(["convert", str(phantom_dir / "Images" / "Phantom_000"), str(folder / "ct.nii.gz")],
                    capsys, f"the output folder cannot be written ({reason})")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the mode")
def test_read_only_output_is_refused_before_work(run_dir, phantom_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        _every_output_refused(phantom_dir, run_dir, tmp_path, locked, capsys, "Permission denied")
    finally:
        locked.chmod(0o755)


def test_read_only_mount_is_refused_before_work(run_dir, phantom_dir, tmp_path, capsys):
    """The root-proof half of the case above: a real read-only tmpfs (needs mount rights)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        _every_output_refused(phantom_dir, run_dir, tmp_path, mount, capsys, "Read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


# --------------------------------------------------------------------------- D11: shared folders

def test_runs_one_after_another_into_one_folder_keep_every_row(run_dir, phantom_dir, tmp_path):
    out = tmp_path / "out"
    assert _predict(run_dir, phantom_dir / "Images" / "Phantom_000", out) == 0
    assert _predict(run_dir, phantom_dir / "Images" / "Phantom_001", out) == 0
    rows = _rows(out / "predictions.csv")
    assert set(rows) == {"Phantom_000", "Phantom_001"}
    assert all(r["status"] == "ok" for r in rows.values())


def test_concurrent_writers_of_one_table_lose_no_row(tmp_path):
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from ctseg.infer.cases import CasePrediction, write_csv
        tag, out = sys.argv[1], Path(sys.argv[2])
        for i in range(40):
            write_csv([CasePrediction(f"{tag}_{k:02d}", "ok") for k in range(i + 1)], out / "predictions.csv")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, tag, str(tmp_path)], env=env) for tag in "ab"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert set(_rows(tmp_path / "predictions.csv")) == {f"{t}_{k:02d}" for t in "ab" for k in range(40)}


# --------------------------------------------------------------------------- D14: hygiene

def test_formula_like_case_names_are_escaped_in_csv_files(run_dir, phantom_dir, tmp_path):
    assert [csv_cell(s) for s in ("=1+1", "+x", "-x", "@x", "'=x", "a=b")] == \
        ["'=1+1", "'+x", "'-x", "'@x", "''=x", "a=b"]
    assert all(csv_uncell(csv_cell(s)) == s for s in ("=1+1", "'=x", "'plain", "a"))
    source = _convert(phantom_dir, "Phantom_000", tmp_path / "in" / "=HYPERLINK(1).nii.gz")
    out = tmp_path / "out"
    assert _predict(run_dir, source, out) == 0
    text = (out / "predictions.csv").read_text()
    assert "\n'=HYPERLINK(1)," in text and "\n=HYPERLINK" not in text
    truth = tmp_path / "truth" / "=HYPERLINK(1)"
    shutil.copytree(phantom_dir / "Images" / "Phantom_000", truth)
    shutil.copy(phantom_dir / "Segmentations" / "Phantom_000_seg.npz", truth.parent / "=HYPERLINK(1)_seg.npz")
    assert main(["evaluate", "--pred", str(out), "--truth", str(tmp_path / "truth"),
                 "--output", str(tmp_path / "eval")]) == 0
    for name in ("cases.csv", "slices.csv"):
        lines = (tmp_path / "eval" / name).read_text().splitlines()[1:]
        assert lines and all(line.startswith("'=HYPERLINK(1),") for line in lines), name


def test_a_newline_in_a_file_name_cannot_forge_a_log_line(run_dir, phantom_dir, tmp_path, capsys, caplog):
    assert log_text("a\nINFO forged\r\x1b[2J") == "a\\nINFO forged\\r\\x1b[2J"
    assert log_text("Ünïcode name") == "Ünïcode name"
    name = "case\nINFO ctseg: all good"
    source = _convert(phantom_dir, "Phantom_000", tmp_path / "in" / f"{name}.nii.gz")
    source.with_name("broken.nii.gz").write_bytes(b"not a nifti")
    with caplog.at_level("INFO"):
        assert _predict(run_dir, source.parent, tmp_path / "out") == 1
    captured = capsys.readouterr()
    for line in (captured.out + captured.err + caplog.text).splitlines():
        assert not line.startswith("INFO ctseg: all good"), line
    assert "case\\nINFO ctseg: all good" in captured.out


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ctseg.utils import atomic_path
    with atomic_path(Path(sys.argv[1])) as tmp:
        with open(tmp, "wb") as fh:
            for i in range(10000):
                fh.write(b"new" * 100000)
                fh.flush()
                if i == 0:
                    print("writing", flush=True)
                time.sleep(0.01)
""")


def test_sigkill_mid_write_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old" * 1000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftover.stat().st_size > 0  # the write really was under way
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert target.read_bytes() == b"old" * 1000
    assert leftover.exists()  # SIGKILL runs no cleanup...
    keep = tmp_path / ".notes.tmp"  # ...and a temp file of another tool is not ctseg's to delete
    keep.write_text("x")
    atomic_write_text(tmp_path / "other.txt", "next write")
    assert not leftover.exists() and keep.exists()
    assert target.read_bytes() == b"old" * 1000


def test_failed_rename_keeps_the_old_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def refuse(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_path(target) as tmp:
            tmp.write_text("new, complete content")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
