"""Right/left lungs from a binary mask (the patient's axis from the affine) and per-label statistics."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ctseg.infer.lungs import LEFT, RIGHT, split_lungs
from ctseg.infer.statistics import label_statistics
from ctseg.io import load_mask, load_series


@pytest.fixture(scope="module")
def phantom_case(phantom_dir):
    """A phantom CT with its true lung mask and the truth of which voxel is which lung."""
    volume = load_series(phantom_dir / "Images" / "Phantom_000")
    mask = load_mask(phantom_dir / "Segmentations" / "Phantom_000_seg.npz", volume).astype(np.uint8)
    # The phantom's right lung lies at negative DICOM (LPS) x, the patient's right; its lungs are
    # two components separated by the mediastinum. RAS x = -LPS x.
    cols = np.arange(mask.shape[2])
    lps_x = -(volume.affine[0, 0] * cols + volume.affine[0, 3])
    centre = lps_x[np.nonzero(mask.any(axis=(0, 1)))[0]].mean()
    truth = np.where(mask > 0, np.where(lps_x[None, None, :] < centre, RIGHT, LEFT), 0).astype(np.uint8)
    return volume, mask, truth


def test_split_lungs_labels_each_lung_by_the_patients_side(phantom_case) -> None:
    volume, mask, truth = phantom_case
    split = split_lungs(mask, volume.affine, volume.array)
    assert set(np.unique(split)) == {0, RIGHT, LEFT}
    np.testing.assert_array_equal(split, truth)
    right_volume = np.count_nonzero(split == RIGHT)
    assert right_volume > np.count_nonzero(split == LEFT)  # the phantom's right lung is larger


def test_split_lungs_follows_the_affine_not_the_array_order(phantom_case) -> None:
    """The same patient stored with the x axis reversed: the same voxels get the same lung."""
    volume, mask, truth = phantom_case
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = mask.shape[2] - 1  # voxel i -> n-1-i
    flipped_affine = volume.affine @ flip
    split = split_lungs(mask[:, :, ::-1], flipped_affine, volume.array[:, :, ::-1])
    np.testing.assert_array_equal(split[:, :, ::-1], truth)
    # the array as it was, but an affine that says x runs the other way: the lungs swap
    swapped = split_lungs(mask, flipped_affine, volume.array)
    np.testing.assert_array_equal(swapped, np.select([truth == RIGHT, truth == LEFT], [LEFT, RIGHT], 0))


def test_touching_lungs_are_cut_at_the_body_midline_with_a_warning(phantom_case, caplog) -> None:
    volume, mask, truth = phantom_case
    joined = mask.copy()
    rows = np.nonzero(mask.any(axis=(0, 2)))[0]
    z = np.nonzero(mask.any(axis=(1, 2)))[0]
    cols = np.nonzero(mask.any(axis=(0, 1)))[0]
    joined[z[len(z) // 2], rows[len(rows) // 2], cols[0]:cols[-1] + 1] = 1  # a bridge between them
    bridge = (joined > 0) & (mask == 0)
    with caplog.at_level(logging.WARNING, logger="ctseg.infer.lungs"):
        split = split_lungs(joined, volume.affine, volume.array)
    assert "the lungs touch" in caplog.text and "body's centre" in caplog.text
    lungs = mask > 0
    agreement = np.count_nonzero(split[lungs] == truth[lungs]) / np.count_nonzero(lungs)
    assert agreement > 0.99  # the phantom's body centre is within mm of the midline between lungs
    assert set(np.unique(split[bridge])) == {RIGHT, LEFT}  # the bridge is cut, not given to one side


def test_split_lungs_of_an_empty_mask_is_empty(phantom_case) -> None:
    volume, mask, _ = phantom_case
    assert not split_lungs(np.zeros_like(mask), volume.affine, volume.array).any()


def test_statistics_match_numpy_on_the_phantom(phantom_case) -> None:
    volume, _, truth = phantom_case
    stats = label_statistics(truth, volume.array, volume.spacing, {RIGHT: "right lung", LEFT: "left lung"})
    voxel_ml = np.prod(volume.spacing) / 1000.0
    for value, name in ((RIGHT, "right lung"), (LEFT, "left lung")):
        inside = truth == value
        entry = stats["labels"][name]
        assert entry["label"] == value and entry["voxels"] == np.count_nonzero(inside)
        assert entry["volume_ml"] == pytest.approx(np.count_nonzero(inside) * voxel_ml, abs=1e-3)
        assert entry["mean_hu"] == pytest.approx(volume.array[inside].astype(np.float64).mean(), abs=0.01)
        assert entry["mean_hu"] < -700  # lung, not soft tissue
    foreground = truth > 0
    assert stats["foreground"]["voxels"] == np.count_nonzero(foreground)
    assert stats["foreground"]["mean_hu"] == pytest.approx(volume.array[foreground].astype(np.float64).mean(), abs=0.01)


def test_statistics_list_absent_labels_as_empty() -> None:
    labels = np.zeros((2, 3, 3), np.uint8)
    labels[0, 0, 0] = 3
    hu = np.full(labels.shape, -800.0, np.float32)
    stats = label_statistics(labels, hu, (2.0, 1.0, 0.5), {1: "lung"})
    assert stats["labels"]["lung"] == {"label": 1, "voxels": 0, "volume_ml": 0.0, "mean_hu": None}
    assert stats["labels"]["label 3"] == {"label": 3, "voxels": 1, "volume_ml": 0.001, "mean_hu": -800.0}


def test_split_lungs_is_refused_for_a_multi_class_model() -> None:
    from pathlib import Path

    from ctseg.config import resolve_config
    from ctseg.errors import ConfigError
    from ctseg.infer import Segmenter
    from ctseg.infer.model_loader import LoadedModel
    from ctseg.networks import build_network

    config = resolve_config({"data": {"num_classes": 3}, "model": {"features": [4, 8]}})
    loaded = LoadedModel(build_network("unet", 1, 3, features=(4, 8)).eval(), config, None,
                         Path("three_classes.pt"), "checkpoint")
    with pytest.raises(ConfigError, match="binary lung model"):
        Segmenter(loaded, split_lungs=True)
    assert Segmenter(loaded).label_names == {1: "label 1", 2: "label 2"}
