"""`predict_cases` reads the next case and writes the previous one while the network runs: the
files and rows are those of segmenting each case alone, a failing case in the middle still fails
alone, and no more than two cases hold their arrays at once."""

from __future__ import annotations

import csv
import gc
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctseg.infer.cases import predict_cases
from ctseg.infer.model_loader import load_model
from ctseg.infer.segmenter import Segmenter
from ctseg.infer.statistics import label_statistics
from ctseg.io import load_image
from ctseg.io.volume import CTVolume

from infer_helpers import tiny_run

CASES = ("Phantom_000", "Phantom_001", "Phantom_002")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir) -> Path:
    return tiny_run(tmp_path_factory, phantom_dir)


class CountingSegmenter(Segmenter):
    """A real Segmenter that notes, at each case, how many of this run's CT volumes are alive."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before = {id(o) for o in gc.get_objects() if isinstance(o, CTVolume)}
        self.alive: list[int] = []

    def segment(self, volume, *args, **kwargs):
        self.alive.append(sum(isinstance(o, CTVolume) and id(o) not in self.before for o in gc.get_objects()))
        return super().segment(volume, *args, **kwargs)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_overlapped_cases_equal_each_case_alone(run_dir, phantom_dir, tmp_path):
    segmenter = CountingSegmenter(load_model(run_dir, device="cpu"))
    results = predict_cases(segmenter, phantom_dir, tmp_path)
    assert [r.case for r in results] == list(CASES) and all(r.ok for r in results)
    assert [row["case"] for row in _rows(tmp_path / "predictions.csv")] == list(CASES)
    assert len(segmenter.alive) == 3 and max(segmenter.alive) <= 2
    statistics = json.loads((tmp_path / "statistics.json").read_text())["cases"]
    for case in CASES:
        volume = load_image(phantom_dir / "Images" / case)
        alone = Segmenter(load_model(run_dir, device="cpu")).segment(volume).labels
        written = np.asarray(nib.load(tmp_path / f"{case}.nii.gz").dataobj).transpose(2, 1, 0)
        assert alone.any()
        np.testing.assert_array_equal(written, alone)
        stats = label_statistics(alone, volume.array, volume.spacing, segmenter.label_names)
        assert json.loads((tmp_path / f"{case}.statistics.json").read_text()) == json.loads(
            json.dumps({"case": case, **stats}))
        assert statistics[case] == json.loads(json.dumps(stats))


def test_a_case_failing_between_two_others_fails_alone(run_dir, phantom_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    out = tmp_path / "out"
    loaded = load_model(run_dir, device="cpu")
    assert all(r.ok for r in predict_cases(loaded, data, out))
    first = {case: (out / f"{case}.nii.gz").read_bytes() for case in CASES}
    for dcm in (data / "Images" / "Phantom_001").iterdir():  # unreadable now: its old mask must go
        dcm.write_bytes(b"not a DICOM file")
    results = predict_cases(loaded, data, out)
    assert [(r.case, r.status) for r in results] == [("Phantom_000", "ok"), ("Phantom_001", "failed"),
                                                     ("Phantom_002", "ok")]
    assert results[1].error
    assert not (out / "Phantom_001.nii.gz").exists()
    assert not (out / "Phantom_001.statistics.json").exists()
    for case in ("Phantom_000", "Phantom_002"):
        assert (out / f"{case}.nii.gz").read_bytes() == first[case]  # deterministic, byte for byte
    rows = {row["case"]: row for row in _rows(out / "predictions.csv")}
    assert rows["Phantom_001"]["status"] == "failed" and rows["Phantom_002"]["status"] == "ok"
    assert "Phantom_001" not in json.loads((out / "statistics.json").read_text())["cases"]
