"""predict_volume: geometry, preprocessing from the config, activation, TTA, context, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ctseg.errors import ConfigError, ModelError
from ctseg.infer.volume import inference_batch_size, predict_volume, preprocess_volume
from ctseg.networks import build_network


class WindowThreshold(nn.Module):
    """A fixed 'network': logit = 40 * (windowed centre channel - 0.5), i.e. HU above the window centre."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x[:, self.channels // 2 : self.channels // 2 + 1] - 0.5)


def _volume() -> np.ndarray:
    """(6, 45, 37) HU: air with a soft-tissue block whose extent changes along z."""
    hu = np.full((6, 45, 37), -1000.0, dtype=np.float32)
    for z in range(6):
        hu[z, 5 + z : 35, 8 : 20 + 2 * z] = 40.0
    return hu


CONFIG = {"data": {"size": [32, 32], "window": [-1000, 400]}, "infer": {"batch_size": 4}}


def test_labels_and_probabilities_at_original_resolution():
    hu = _volume()
    model = WindowThreshold().train()
    labels, probs = predict_volume(model, hu, CONFIG, "cpu")
    assert labels.shape == hu.shape and labels.dtype == np.uint8
    assert probs.shape == (2, *hu.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-6)
    truth = (hu > -300).astype(np.uint8)  # the window centre
    assert np.mean(labels == truth) > 0.98  # only resize blur at the block edges may differ
    for z in range(6):  # each slice keeps its own content: no mixing along z
        assert abs(int(labels[z].sum()) - int(truth[z].sum())) < 0.1 * truth[z].sum()
    assert model.training  # the caller's mode is restored


def test_flip_tta_and_threshold_from_config():
    hu = _volume()
    plain, _ = predict_volume(WindowThreshold(), hu, CONFIG)
    tta, _ = predict_volume(WindowThreshold(), hu, {**CONFIG, "infer": {"tta": [0, 1]}})
    assert np.mean(plain == tta) > 0.98
    strict, _ = predict_volume(WindowThreshold(), hu, {**CONFIG, "infer": {"threshold": 0.999999}})
    assert strict.sum() < plain.sum()


def test_context_slices_become_channels():
    hu = _volume()
    x = preprocess_volume(hu, {**CONFIG, "data": {**CONFIG["data"], "context": 3}})
    assert x.shape == (6, 3, 32, 32)
    torch.testing.assert_close(x[2, 1], x[3, 0])  # slice 2 is the centre of 2 and the left of 3
    labels, _ = predict_volume(WindowThreshold(3), hu, {**CONFIG, "data": {**CONFIG["data"], "context": 3}})
    assert labels.shape == hu.shape


def test_multiclass_softmax_argmax_with_a_registry_network():
    config = {**CONFIG, "data": {**CONFIG["data"], "num_classes": 3}}
    model = build_network("unet", 1, 3, features=[4, 8])
    labels, probs = predict_volume(model, _volume(), config)
    assert probs.shape == (3, 6, 45, 37)
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))
    with pytest.raises(ModelError, match="num_classes"):
        predict_volume(model, _volume(), CONFIG)
    with pytest.raises(ModelError, match="z, y, x"):
        predict_volume(model, _volume()[0], config)


def test_auto_batch_size_depends_on_the_device_and_bad_values_are_refused():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inference_batch_size({"infer": {"batch_size": "auto"}}, cpu) == 4
    assert inference_batch_size({}, cuda) == 32
    assert inference_batch_size({"infer": {"batch_size": 7}}, cpu) == 7
    for bad in (0, -2, 2.5, "many", True):
        with pytest.raises(ConfigError, match="infer.batch_size"):
            inference_batch_size({"infer": {"batch_size": bad}}, cpu)
    # Same labels whatever the batch: the batch only groups slices.
    model = WindowThreshold()
    by_two = predict_volume(model, _volume(), {**CONFIG, "infer": {"batch_size": 2}}, "cpu")[0]
    auto = predict_volume(model, _volume(), {**CONFIG, "infer": {"batch_size": "auto"}}, "cpu")[0]
    np.testing.assert_array_equal(by_two, auto)


class WindowClasses(nn.Module):
    """Three classes by windowed intensity: logits 0, 40 * (x - 0.3), 80 * (x - 0.6)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 40 * (x - 0.3), 80 * (x - 0.6)], dim=1)


@pytest.mark.parametrize("classes", [2, 3])
def test_labels_without_probabilities_are_the_same_labels(classes):
    model = WindowThreshold() if classes == 2 else WindowClasses()
    config = {**CONFIG, "data": {**CONFIG["data"], "num_classes": classes}}
    hu = np.random.default_rng(classes).normal(-300, 400, (5, 45, 37)).astype(np.float32)
    labels, probs = predict_volume(model, hu, config, "cpu")
    lean, none = predict_volume(model, hu, config, "cpu", probabilities=False)
    assert none is None and probs.shape == (classes, 5, 45, 37)
    assert set(np.unique(labels)) == set(range(classes))  # a real mixture of labels to compare
    np.testing.assert_array_equal(lean, labels)
