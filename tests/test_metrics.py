"""ctseg.evaluate.metrics against values worked out by hand on tiny volumes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctseg.errors import MaskError
from ctseg.evaluate.metrics import segmentation_metrics, slice_dice


def _cube_pair() -> tuple[np.ndarray, np.ndarray]:
    """Truth: 3x4x4 block (48 voxels); prediction: the same block moved one voxel along y."""
    truth = np.zeros((5, 10, 10), np.uint8)
    truth[1:4, 2:6, 2:6] = 1
    pred = np.zeros_like(truth)
    pred[1:4, 3:7, 2:6] = 1
    return pred, truth


def test_overlap_metrics_by_hand():
    pred, truth = _cube_pair()
    m = segmentation_metrics(pred, truth, spacing=(3.0, 1.0, 1.0), distances=False)
    # overlap 3*3*4 = 36 voxels; 12 false positives, 12 false negatives, 500 voxels in all
    assert m["dice"] == pytest.approx(2 * 36 / (48 + 48))
    assert m["iou"] == pytest.approx(36 / 60)
    assert m["precision"] == pytest.approx(36 / 48)
    assert m["recall"] == pytest.approx(36 / 48)
    assert m["accuracy"] == pytest.approx((500 - 24) / 500)
    assert m["truth_ml"] == pytest.approx(48 * 3.0 / 1000)
    assert "hd95_mm" not in m


def test_single_voxel_distances_use_anisotropic_spacing():
    truth = np.zeros((6, 12, 12), np.uint8)
    truth[2, 5, 5] = 1
    pred = np.zeros_like(truth)
    pred[3, 5, 7] = 1  # one slice up, two columns right
    spacing = (2.5, 0.5, 0.5)
    expected = math.hypot(2.5, 2 * 0.5)
    m = segmentation_metrics(pred, truth, spacing=spacing, tolerance_mm=2.0)
    assert m["hd95_mm"] == pytest.approx(expected, rel=1e-5)
    assert m["assd_mm"] == pytest.approx(expected, rel=1e-5)
    assert m["nsd"] == 0.0  # 2.69 mm apart: outside the 2 mm tolerance
    assert segmentation_metrics(pred, truth, spacing, tolerance_mm=3.0)["nsd"] == 1.0
    # the same voxels with isotropic 1 mm spacing are sqrt(1 + 4) mm apart
    assert segmentation_metrics(pred, truth, (1.0, 1.0, 1.0))["hd95_mm"] == pytest.approx(math.sqrt(5), rel=1e-5)


def test_hd95_ignores_a_single_outlier_but_assd_does_not():
    truth = np.zeros((6, 8, 24), np.uint8)
    truth[2, 5, 0:20] = 1  # a 20-voxel line: every voxel is a surface voxel
    pred = truth.copy()
    pred[4, 5, 10] = 1  # one stray voxel two slices (6 mm) away
    m = segmentation_metrics(pred, truth, spacing=(3.0, 1.0, 1.0))
    # pred->truth: 20 zeros and one 6 mm; truth->pred: 20 zeros. 95th percentile of 21 values
    # (linear interpolation at index 19 of the sorted 0..20) is 0; ASSD = 6 mm / 41 distances.
    assert m["hd95_mm"] == pytest.approx(0.0, abs=1e-6)
    assert m["assd_mm"] == pytest.approx(6.0 / 41, rel=1e-5)
    assert m["nsd"] == pytest.approx(40 / 41, rel=1e-5)


def test_empty_masks():
    empty = np.zeros((4, 6, 6), np.uint8)
    both = segmentation_metrics(empty, empty, (3.0, 1.0, 1.0))  # a class nobody drew: not scored
    assert {k: v for k, v in both.items() if not math.isnan(v)} == {"accuracy": 1.0, "truth_ml": 0.0, "pred_ml": 0.0}
    assert all(math.isnan(both[k]) for k in ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm", "nsd"))

    truth = empty.copy()
    truth[1, 2:4, 2:4] = 1
    missed = segmentation_metrics(empty, truth, (3.0, 1.0, 1.0))
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0 and missed["recall"] == 0.0
    assert math.isnan(missed["precision"])  # nothing predicted: 0/0
    assert math.isinf(missed["hd95_mm"]) and math.isinf(missed["assd_mm"])
    assert missed["nsd"] == 0.0
    assert missed["accuracy"] == pytest.approx(1 - 4 / empty.size)

    invented = segmentation_metrics(truth, empty, (3.0, 1.0, 1.0))
    assert invented["dice"] == 0.0 and math.isnan(invented["recall"]) and math.isinf(invented["hd95_mm"])


def test_multiclass_keys_and_means():
    pred, truth = _cube_pair()
    truth[1:4, 7:9, 7:9] = 2  # 12 voxels
    pred[1:4, 7:9, 6:8] = 2   # shifted one voxel along x: 6 overlap
    m = segmentation_metrics(pred, truth, (3.0, 1.0, 1.0), num_classes=3, distances=False)
    assert m["dice_1"] == pytest.approx(0.75)
    assert m["dice_2"] == pytest.approx(2 * 6 / 24)
    assert m["dice"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["accuracy"] == pytest.approx(np.mean(pred == truth))
    assert m["truth_ml"] == pytest.approx((48 + 12) * 3.0 / 1000)


def test_classes_absent_from_both_masks_are_left_out_of_the_means():
    # issue 17 D3: truth {0, 5} vs prediction {0, 1}, no overlap, used to report Dice 0.6
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[1:3, 1:4, 1:4] = 5
    pred = np.zeros_like(truth)
    pred[1:3, 5:8, 5:8] = 1
    m = segmentation_metrics(pred, truth, (2.0, 1.0, 1.0), num_classes=6)
    assert m["dice_1"] == 0.0 and m["dice_5"] == 0.0 and m["dice"] == 0.0
    assert all(math.isnan(m[f"{k}_{c}"]) for k in ("dice", "iou", "nsd", "hd95_mm") for c in (2, 3, 4))
    assert math.isinf(m["hd95_mm"]) and m["nsd"] == 0.0
    truth[1:3, 5:8, 5:8] = 1  # class 1 now right: the mean is over classes 1 and 5 only
    m = segmentation_metrics(pred, truth, (2.0, 1.0, 1.0), num_classes=6, distances=False)
    assert m["dice_1"] == 1.0 and m["dice"] == 0.5
    with pytest.raises(MaskError, match="outside 0..1"):
        segmentation_metrics(pred, truth, (2.0, 1.0, 1.0), num_classes=2)


def test_slice_dice_empty_slice_rule():
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[1, 2:6, 2:6] = 1  # 16 pixels
    pred = np.zeros_like(truth)
    pred[1, 2:6, 2:4] = 1   # 8 pixels inside the truth
    pred[2, 0, 0:3] = 1     # 3 stray pixels on an empty-truth slice
    pred[3, 0:4, 0:4] = 1   # 16 stray pixels on an empty-truth slice
    got = slice_dice(pred, truth, empty_threshold=5)
    np.testing.assert_allclose(got, [1.0, 2 * 8 / 24, 1.0, 0.0])
    np.testing.assert_allclose(slice_dice(pred, truth, empty_threshold=0), [1.0, 2 * 8 / 24, 0.0, 0.0])
    np.testing.assert_allclose(slice_dice(pred, truth, empty_threshold=20), [1.0, 2 * 8 / 24, 1.0, 1.0])


def test_refuses_mismatched_or_bad_input():
    pred, truth = _cube_pair()
    with pytest.raises(MaskError, match="shape"):
        segmentation_metrics(pred[:-1], truth, (1.0, 1.0, 1.0))
    with pytest.raises(MaskError, match="spacing"):
        segmentation_metrics(pred, truth, (1.0, 1.0))
    with pytest.raises(MaskError, match="labels"):
        segmentation_metrics(pred * 3, truth, (1.0, 1.0, 1.0))
    with pytest.raises(MaskError, match="integer"):
        slice_dice(pred.astype(np.float32), truth)
