"""The MONAI transform chain built from the config: window, per-slice resize, augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Rand2DElasticd, RandAdjustContrastd, RandFlipd, RandGaussianNoised, RandRotated, RandZoomd

from ctseg.data.dataset import context_indices, stack_context
from ctseg.errors import ConfigError
from ctseg.transforms import (augment_transforms, label_channels, preprocess_transforms, resize_transform,
                              train_transforms, training_size, window_transform)

ALL_AUGMENT = {
    "rotate": {"prob": 1.0, "degrees": 15},
    "scale": {"prob": 1.0, "range": 0.2},
    "elastic": {"prob": 1.0, "spacing": 8, "magnitude": [1, 2]},
    "flip": {"prob": 1.0, "axes": [1]},
    "contrast": {"prob": 1.0, "gamma": [0.8, 1.2]},
    "noise": {"prob": 1.0, "std_hu": 14},
}


def test_window_maps_hu_to_unit_range_and_clips():
    out = window_transform({"data": {"window": [-1000, 400]}})(
        {"image": np.array([[[-2000.0, -1000.0, -300.0, 400.0, 3000.0]]], dtype=np.float32)})
    np.testing.assert_allclose(np.asarray(out["image"]).ravel(), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="data.size"):
        training_size({"data": {"size": "big"}})
    with pytest.raises(ConfigError, match="data.window"):
        window_transform({"data": {"window": [400, -1000]}})
    with pytest.raises(ConfigError, match="augment.flip.prob"):
        augment_transforms({"augment": {"flip": {"prob": 2}}})
    assert training_size({"data": {"size": 96}}) == (96, 96)


def test_preprocess_windows_then_resizes_each_slice_on_its_own():
    # slice k is a constant HU value; air (-1000 HU) around a body square
    hu = np.full((5, 40, 52), -1000.0, dtype=np.float32)
    for k in range(5):
        hu[k, 8:32, 10:42] = -1000 + 300 * k
    label = np.zeros((5, 40, 52), dtype=np.uint8)
    label[:, 10:30, 12:40] = 2
    config = {"data": {"size": [20, 26], "window": [-1000, 400], "num_classes": 3}}
    channels = label_channels(label, config)
    assert channels.shape == (15, 40, 52)
    out = preprocess_transforms(config)({"image": hu, "label": channels})
    image, soft = np.asarray(out["image"]), np.asarray(out["label"]).reshape(5, 3, 20, 26)
    assert image.shape == (5, 20, 26)
    for k in range(5):  # slices never mix: the body centre of slice k keeps its own value
        np.testing.assert_allclose(image[k, 10, 13], 300 * k / 1400, atol=1e-3)
    assert np.abs(image[:, 0, :]).max() < 1e-6  # windowed air at the border stays exactly air
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)  # soft one-hot per pixel
    assert soft.min() >= 0 and soft[:, 1].max() == 0  # class 1 is absent everywhere
    np.testing.assert_allclose(soft[:, 2].mean(), (label == 2).mean(), rtol=0.02)  # area kept
    only_image = resize_transform(config, ("image",))({"image": hu[:, :20, :26]})
    assert np.asarray(only_image["image"]).shape == (5, 20, 26)


def test_resized_labels_keep_their_position():
    """512 -> 256 -> 512 (soft label down, bilinear up, threshold) returns the same mask.

    A nearest-neighbour label down-sampling would shift it by half a pixel instead.
    """
    yy, xx = np.mgrid[0:128, 0:128]
    label = ((yy - 61.3) ** 2 / 900 + (xx - 70.2) ** 2 / 1600 < 1).astype(np.uint8)[None]
    config = {"data": {"size": [64, 64]}}
    soft = np.asarray(resize_transform(config, ("label",))({"label": label_channels(label, config)})["label"])
    up = torch.nn.functional.interpolate(torch.from_numpy(soft)[None], size=(128, 128), mode="bilinear")
    back = up[0, 0].numpy() >= 0.5
    dice = 2 * (back & (label[0] > 0)).sum() / (back.sum() + label.sum())
    assert dice > 0.995


def test_augmentations_each_present_and_label_stays_consistent():
    config = {"data": {"window": [-1000, 400]}, "augment": ALL_AUGMENT}
    kinds = [type(t) for t in augment_transforms(config)]
    assert kinds == [RandRotated, RandZoomd, Rand2DElasticd, RandFlipd, RandAdjustContrastd, RandGaussianNoised]
    noise = augment_transforms(config)[-1]
    assert noise.rand_gaussian_noise.std == pytest.approx(14 / 1400)
    assert augment_transforms({"augment": {"rotate": {"prob": 0}}}) == []

    image = np.zeros((1, 48, 48), dtype=np.float32)  # windowed: air 0, soft tissue ~0.7
    label = np.zeros((1, 48, 48), dtype=np.float32)
    image[0, 10:30, 5:20] = 0.7
    label[0, 10:30, 5:20] = 1.0
    chain = train_transforms(config)
    chain.set_random_state(seed=7)
    out = chain({"image": image, "label": label})
    assert isinstance(out["image"], torch.Tensor) and out["image"].shape == (1, 48, 48)
    lab = out["label"].numpy()
    assert lab.min() >= 0.0 and lab.max() <= 1.0 + 1e-6
    # after the same spatial transforms, the label still covers the bright object (noise aside)
    inside = out["image"].numpy()[lab > 0.9]
    outside = out["image"].numpy()[lab < 0.1]
    assert inside.mean() > outside.mean() + 0.3
    # flipped left-right: the object moved to the right half
    assert lab[0, :, 24:].sum() > 3 * lab[0, :, :24].sum()
    again = train_transforms(config)
    again.set_random_state(seed=7)
    torch.testing.assert_close(again({"image": image, "label": label})["image"], out["image"])


def test_context_stacking_clamps_at_the_ends():
    assert context_indices(0, 10, 3).tolist() == [0, 0, 1]
    assert context_indices(9, 10, 5).tolist() == [7, 8, 9, 9, 9]
    volume = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, 2, 2)
    stacked = stack_context(volume, 3)
    assert stacked.shape == (4, 3, 2, 2)
    assert stacked[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
