"""ctseg's scipy post-processing computes exactly what MONAI's transforms compute (the bundle runs MONAI's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt
from scipy import ndimage

from ctseg.infer.postprocess import postprocess_labels, postprocess_steps

from infer_helpers import tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir):
    return tiny_run(tmp_path_factory, phantom_dir)


def _monai(labels_zyx: np.ndarray, steps) -> np.ndarray:
    volume = torch.from_numpy(np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)))[None]
    out = mt.Compose([getattr(mt, name)(**kwargs) for name, kwargs in steps])(volume)
    return np.asarray(out)[0].transpose(2, 1, 0).astype(np.uint8)


def _steps(num_classes: int, keep, connectivity, fill: bool = True):
    config = {"infer": {"postprocess": {"keep_largest": keep, "connectivity": connectivity, "fill_holes": fill}}}
    return postprocess_steps(config, num_classes)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("connectivity", [None, 1, 2])
def test_random_blobs_match_monai(seed, connectivity):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random((12, 18, 20)), 1.0 + 0.3 * (seed % 3))
    num_classes = 2 if seed % 2 else 3
    labels = np.digitize(field, np.quantile(field, [0.6, 0.85][: num_classes - 1])).astype(np.uint8)
    labels[(rng.random(labels.shape) < 0.05) & (labels > 0)] = 0  # holes, some enclosed
    keep = 2 if num_classes == 2 else {1: 1, 2: 3}
    steps = _steps(num_classes, keep, connectivity)
    np.testing.assert_array_equal(postprocess_labels(labels, steps), _monai(labels, steps))


def test_ties_between_equal_components_are_broken_as_monai_breaks_them():
    labels = np.zeros((10, 30, 30), np.uint8)
    for k in range(6):  # six equal cubes, plus two touching diagonally (one component at 26-connectivity)
        y, x = 2 + 9 * (k // 3), 2 + 9 * (k % 3)
        labels[3:6, y:y + 3, x:x + 3] = 1
    labels[7, 0, 0] = labels[8, 1, 1] = 1
    for connectivity in (None, 1):
        for keep in (1, 2, 4):
            steps = _steps(2, keep, connectivity)
            ours = postprocess_labels(labels, steps)
            np.testing.assert_array_equal(ours, _monai(labels, steps))
            assert np.count_nonzero(ours) == keep * 27


def test_touching_labels_and_a_hole_holding_another_label():
    labels = np.zeros((9, 9, 9), np.uint8)
    labels[1:8, 1:8, 1:8] = 1
    labels[3:6, 3:6, 3:6] = 0
    labels[4, 4, 4] = 2  # inside label 1's hole: MONAI fills the whole enclosed region with 1
    labels[0, 0:3, 0:3] = 2
    steps = _steps(3, 1, None)
    ours = postprocess_labels(labels, steps)
    np.testing.assert_array_equal(ours, _monai(labels, steps))
    assert ours[4, 4, 4] == 1


@pytest.mark.parametrize("shape", [(1, 5, 5), (4, 1, 6), (3, 4, 5)])
def test_empty_full_and_thin_volumes_match_monai(shape):
    steps = _steps(2, 2, None)
    for labels in (np.zeros(shape, np.uint8), np.ones(shape, np.uint8)):
        out = postprocess_labels(labels, steps)
        assert out.dtype == np.uint8 and out.shape == shape
        np.testing.assert_array_equal(out, _monai(labels, steps))
    labels = np.zeros(shape, np.uint8)
    labels[..., ::2] = 1  # stripes: several components, all touching the border
    np.testing.assert_array_equal(postprocess_labels(labels, steps), _monai(labels, steps))


def test_phantom_prediction_matches_monai(run_dir, phantom_dir):
    from ctseg.infer.model_loader import load_model
    from ctseg.io import load_image
    from ctseg.infer.volume import predict_volume

    loaded = load_model(run_dir, device="cpu")
    volume = load_image(phantom_dir / "Images" / "Phantom_000")
    labels, _ = predict_volume(loaded.model, volume.array, loaded.config, "cpu")
    labels[labels.shape[0] // 2, :3, :3] = 1  # a speck at the border to prune
    steps = postprocess_steps(loaded.config, 2)
    np.testing.assert_array_equal(postprocess_labels(labels, steps), _monai(labels, steps))
