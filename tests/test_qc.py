"""Training's QC images and `ctseg evaluate`'s gallery pick slices by one rule (evaluate.figures)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ctseg.evaluate.figures import best_median_worst
from ctseg.train.qc import QCCase, rank_slices, write_qc_images


def test_best_median_worst_among_candidates_only():
    dice = np.array([1.0, 0.2, 0.9, 0.5, 0.0])
    assert best_median_worst(dice, np.array([1, 2, 3])) == [("best", 2), ("median", 3), ("worst", 1)]
    assert best_median_worst(dice, np.array([], dtype=int)) == []
    ties = np.array([0.5, 0.5, 0.5])
    assert best_median_worst(ties, np.arange(3)) == [("best", 2), ("median", 1), ("worst", 0)]


def _case(name: str, shifts: list[int]) -> QCCase:
    """Truth a 4x4 square on every slice; prediction the square moved by `shifts[z]` pixels."""
    z = len(shifts)
    truth = np.zeros((z, 12, 12), np.uint8)
    truth[:, 4:8, 4:8] = 1
    pred = np.zeros_like(truth)
    for k, s in enumerate(shifts):
        pred[k, 4:8, 4 + s: 8 + s] = 1
    hu = np.full(truth.shape, -800.0, np.float32)
    return QCCase(name, hu, truth, pred, (0.8, 0.8))


def test_rank_slices_across_cases():
    cases = [_case("a", [0, 3]), _case("b", [1, 2, 4])]  # Dice 1, .25 | .75, .5, 0
    picks = rank_slices(cases)
    assert picks["best"] == (0, 0, 1.0)
    assert picks["worst"] == (1, 2, 0.0)
    assert picks["median"][:2] == (1, 1) and picks["median"][2] == 0.5


def test_empty_slices_are_not_ranked_and_images_are_written(tmp_path):
    case = _case("a", [0, 2])
    case.truth[0] = 0
    case.pred[0] = 0  # empty-empty: trivially perfect, says nothing
    assert {v[1] for v in rank_slices([case]).values()} == {1}
    paths = write_qc_images([case], tmp_path / "qc")
    assert sorted(p.name for p in paths) == ["best.png", "median.png", "worst.png"]
    assert all(Image.open(p).size[0] > 50 for p in paths)
    assert rank_slices([]) == {}
