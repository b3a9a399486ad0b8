"""The command line people expect: --version, -v/-q anywhere, -i/-o, progress bars only on a
terminal, right/left lungs, statistics and DICOM outputs from `ctseg predict`, and the Python API."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctseg import __version__
from ctseg.cli import build_parser, main
from ctseg.errors import ConfigError
from ctseg.infer import Segmenter
from ctseg.io import load_series

from infer_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
CASES = ("Phantom_000", "Phantom_001", "Phantom_002")

#: tqdm's bar over cases at the start of a line (the logger name `ctseg.infer.cases:` is not one)
BAR = re.compile(r"(^|\r)cases:", re.M)


def _ctseg(*args: str, stderr_tty: bool = False, timeout: float = 600) -> tuple[int, str, str]:
    """Run `python -m ctseg.cli` as a user would; stderr on a pseudo-terminal when asked."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "100"}
    if not stderr_tty:
        done = subprocess.run([sys.executable, "-m", "ctseg.cli", *args], capture_output=True,
                              text=True, env=env, timeout=timeout)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ctseg.cli", *args], stdout=subprocess.PIPE,
                                stderr=follower, env=env, text=True)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = proc.stdout.read()
        proc.wait(timeout=timeout)
    finally:
        os.close(leader)
    return proc.returncode, out, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


def test_version_names_ctseg_and_its_numerical_dependencies() -> None:
    code, out, _ = _ctseg("--version")
    assert code == 0
    assert out.startswith(f"ctseg {__version__} (") and "torch" in out and "monai" in out


@pytest.mark.parametrize("argv", [["-v", "phantom", "x"], ["phantom", "x", "-v"], ["phantom", "-v", "x"]])
def test_verbose_is_accepted_before_and_after_the_subcommand(argv) -> None:
    args = build_parser().parse_args(argv)
    assert args.verbose is True and args.quiet is False


def test_quiet_after_the_subcommand_and_defaults_when_absent() -> None:
    parser = build_parser()
    assert parser.parse_args(["series", "d", "--quiet"]).quiet is True
    assert parser.parse_args(["-q", "series", "d"]).quiet is True
    plain = parser.parse_args(["series", "d"])
    assert plain.quiet is False and plain.verbose is False  # a subcommand keeps the top defaults
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["series", "d", "-v", "-q"])
    assert exc.value.code == 2


def test_predict_short_options_split_lungs_statistics_and_dicom_outputs(run_dir, phantom_dir, tmp_path) -> None:
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run_dir), "-i", str(phantom_dir), "-o", str(out),
                 "--device", "cpu", "--split-lungs", "--format", "nifti,rtstruct,dicom-seg", "-q"]) == 0
    rows = {r["case"]: r for r in csv.DictReader(open(out / "predictions.csv", newline=""))}
    folder = json.loads((out / "statistics.json").read_text())["cases"]
    assert set(rows) == set(folder) == set(CASES)
    for case in CASES:
        volume = load_series(phantom_dir / "Images" / case)
        labels = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj).transpose(2, 1, 0)
        assert set(np.unique(labels)) <= {0, 1, 2}
        stats = json.loads((out / f"{case}.statistics.json").read_text())
        assert stats["case"] == case and folder[case] == {k: v for k, v in stats.items() if k != "case"}
        voxel_ml = np.prod(volume.spacing) / 1000.0
        for value, side in ((1, "right"), (2, "left")):
            inside = labels == value
            entry = stats["labels"][f"{side} lung"]
            assert entry["volume_ml"] == pytest.approx(np.count_nonzero(inside) * voxel_ml, abs=1e-3)
            assert float(rows[case][f"{side}_lung_ml"]) == pytest.approx(entry["volume_ml"], abs=0.01)
            if inside.any():
                assert entry["mean_hu"] == pytest.approx(volume.array[inside].astype(np.float64).mean(), abs=0.01)
        foreground = labels > 0
        assert float(rows[case]["mean_hu"]) == pytest.approx(volume.array[foreground].mean(), abs=0.06)
        structure = pydicom.dcmread(out / f"{case}.rtstruct.dcm")
        assert [roi.ROIName for roi in structure.StructureSetROISequence] == ["Right lung", "Left lung"]
        assert pydicom.dcmread(out / f"{case}.seg.dcm", stop_before_pixels=True).Modality == "SEG"


def test_python_api_segments_volumes_in_memory_as_predict_does(run_dir, phantom_dir, tmp_path) -> None:
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(run_dir), "-i", str(phantom_dir), "-o", str(out),
                 "--device", "cpu", "-q"]) == 0
    segmenter = Segmenter.load(run_dir, device="cpu")  # loaded once
    for case in CASES:
        labels = segmenter(load_series(phantom_dir / "Images" / case))
        written = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj).transpose(2, 1, 0)
        np.testing.assert_array_equal(labels, written)
    hu = load_series(phantom_dir / "Images" / CASES[0]).array
    assert segmenter(hu).shape == hu.shape  # a bare HU array works too


def test_progress_bar_on_a_terminal_only_and_not_with_quiet(run_dir, phantom_dir, tmp_path) -> None:
    base = ["predict", "--model", str(run_dir), "--input", str(phantom_dir / "Images" / CASES[0]),
            "--device", "cpu"]
    code, out, err = _ctseg(*base, "--output", str(tmp_path / "tty"), stderr_tty=True)
    assert code == 0, err
    assert "cases: 100%" in err and "1/1" in err  # tqdm's bar, drawn on the terminal
    assert f"{CASES[0]}: 16 slices" in out
    code, out, err = _ctseg(*base, "--output", str(tmp_path / "pipe"))
    assert code == 0, err
    assert not BAR.search(err) and "%|" not in err  # not a terminal: no bar in the log
    assert f"{CASES[0]}: 16 slices" in out
    code, out, err = _ctseg(*base, "--output", str(tmp_path / "quiet"), "--quiet", stderr_tty=True)
    assert code == 0, err
    assert not BAR.search(err) and "%|" not in err and "INFO" not in err
    assert f"{CASES[0]}:" not in out and "1/1 case(s) written" in out


def test_unknown_output_format_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", "m", "-i", "x", "-o", "y", "--format", "nifti,rtss"])
    assert exc.value.code == 2
    assert "choose from nifti, dicom-seg, rtstruct" in capsys.readouterr().err


def test_models_defaults_to_the_shipped_lung_model_and_config_overrides() -> None:
    from ctseg.cli import _models_settings
    from ctseg.config import config_view, load_config

    parser = build_parser()
    shipped = config_view(load_config(REPO / "pipelines" / "lctsc.yaml"))
    assert _models_settings(parser.parse_args(["models"])) == {
        "in_channels": shipped.data.context, "features": list(shipped.model.features),
        "size": max(shipped.size), "variant": shipped.model.variant}
    small = _models_settings(parser.parse_args(["models", "--config", str(REPO / "pipelines" / "train.yaml"),
                                                "--features", "4,8"]))
    assert small["size"] == 128 and small["features"] == [4, 8]  # the config's size, the option's widths


def test_models_rows_come_one_by_one(capsys) -> None:
    """The first network's row exists before the next network is even built."""
    from ctseg.networks.report import iter_network_report

    rows = iter_network_report(names=["unet", "no_such_network"], features=(4, 8), size=16, repeats=1)
    assert next(rows)["name"] == "unet"
    with pytest.raises(ConfigError, match="no_such_network"):
        next(rows)


def test_long_cases_get_a_slice_bar_short_ones_do_not(capsys) -> None:
    from ctseg.cli import _Progress

    progress = _Progress(enabled=True)
    progress.cases(2)
    for done in range(8, 129, 8):  # 128 slices in batches of 8
        progress.slices("long_case", done, 128)
    progress.done()
    for done in range(4, 17, 4):
        progress.slices("short_case", done, 16)
    progress.done()
    progress.close()
    err = capsys.readouterr().err
    assert "long_case" in err and "/128" in err  # updates are throttled by tqdm; the bar was drawn
    assert "short_case" not in err and "cases: 100%" in err and "2/2" in err
