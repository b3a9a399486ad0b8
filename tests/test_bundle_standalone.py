"""The exported bundle runs and fine-tunes in a Python environment where ctseg cannot be imported.

The environment is a real virtual environment (`python -m venv --without-pip`) that sees this
environment's installed packages through a `.pth` file, but not ctseg: ctseg is installed in
editable mode, through a `.pth` hook that a directory listed in another `.pth` does not run. The
commands are the README's bundle blocks, run as they stand with bash.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch

from infer_helpers import tiny_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CASES = ("Phantom_000", "Phantom_001", "Phantom_002")


def readme_block(name: str) -> str:
    """The bash block between `<!-- NAME:start -->` and `<!-- NAME:end -->` in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {name}:start -->\s*```bash\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert match, f"README.md has no {name} block"
    return match.group(1)


def bash(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def venv_without_ctseg(path: Path) -> Path:
    """A venv whose only extra packages are this environment's site-packages (found from monai)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=300)
    site = Path(monai.__file__).resolve().parents[1]
    (target,) = path.glob("lib/python*/site-packages")
    (target / "shared_site_packages.pth").write_text(f"{site}\n")
    return path


def test_bundle_runs_and_fine_tunes_without_ctseg(tmp_path_factory, phantom_dir, tmp_path):
    run_dir = tiny_run(tmp_path_factory, phantom_dir)
    names = {"RUN": run_dir, "BUNDLE": tmp_path / "bundle", "CASES": phantom_dir,
             "PREDICTIONS": tmp_path / "predictions", "MASKS": tmp_path / "masks", "SCORES": tmp_path / "scores"}
    paths = {k: str(v) for k, v in names.items()}

    # Block 1, with ctseg: `.venv` is this test's environment, as in a clone after `make install`.
    root = tmp_path / "clone"
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    bash(readme_block("bundle-export"), {**os.environ, **paths}, root)

    # Block 2, in a venv that cannot import ctseg, activated as `. venv/bin/activate` would.
    venv = venv_without_ctseg(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_", "VIRTUAL_ENV"))}
    env.update(paths, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    probe = subprocess.run(["python", "-c", "import monai, pydicom, nibabel, ignite; import ctseg"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode != 0 and "No module named 'ctseg'" in probe.stderr, probe.stderr[-2000:]
    bash(readme_block("bundle-run"), env, tmp_path)

    for case in CASES:
        ours, theirs = (nib.load(names[d] / f"{case}.nii.gz") for d in ("MASKS", "PREDICTIONS"))
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), err_msg=case)
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        assert np.count_nonzero(np.asarray(ours.dataobj)) > 0

    tuned = torch.load(names["BUNDLE"] / "train" / "model.pt", weights_only=True)
    shipped = torch.load(names["BUNDLE"] / "models" / "model.pt", weights_only=True)
    assert set(tuned) == set(shipped)
    assert any(not torch.equal(tuned[k], shipped[k]) for k in shipped)  # one epoch moved the weights
    assert (names["BUNDLE"] / "train" / "mlruns.db").is_file()
    scores = (names["SCORES"] / "val_mean_dice_raw.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in scores[1:]] == list(CASES)
    assert all(0.0 < float(line.split(",")[-1]) <= 1.0 for line in scores[1:])
