"""`augment.field_of_view`: another scanner's reconstruction field on the training sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctseg.config import config_view
from ctseg.errors import ConfigError
from ctseg.transforms import RandFieldOfViewd, augment_transforms, train_transforms

from test_transforms import ALL_AUGMENT

WINDOW = [-2100, 400]  # reaches below -2000 HU, so each padding value has its own windowed value


def _sample(rows: int = 40, cols: int = 40, channels: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.1, 1.0, (3, rows, cols)).astype(np.float32)  # 2.5D: three slices
    hard = rng.integers(0, channels + 1 if channels > 1 else 2, (rows, cols))
    label = (np.stack([hard == c for c in range(channels)]) if channels > 1 else (hard == 1)[None])
    return {"image": image, "label": label.astype(np.float32)}


def _fov(**spec) -> dict:
    return {"data": {"window": WINDOW}, "augment": {"field_of_view": {"prob": 1.0, **spec}}}


def test_outside_a_circle_the_image_holds_the_padding_and_the_label_is_background():
    [fov] = augment_transforms(_fov(shapes=["circle"], radius=[0.5, 0.5], offset=0.0, fill_hu=[-2000]))
    sample = _sample()
    out = fov(sample)
    yy, xx = np.mgrid[0:40, 0:40]
    outside = (yy - 19.5) ** 2 + (xx - 19.5) ** 2 > 10.0 ** 2  # radius 0.5 of the half-width 20
    assert 0 < outside.sum() < outside.size
    assert np.all(out["image"][:, outside] == np.float32(100 / 2500))  # -2000 HU in the window
    assert np.all(out["label"][:, outside] == 0)
    np.testing.assert_array_equal(out["image"][:, ~outside], sample["image"][:, ~outside])
    np.testing.assert_array_equal(out["label"][:, ~outside], sample["label"][:, ~outside])
    assert sample["label"][:, outside].any()  # the field did cut labelled pixels away


def test_a_square_field_off_centre_and_multiclass_background():
    fov = RandFieldOfViewd(1.0, ["square"], [0.5, 0.5], 0.2, [-1024], (-1000, 400))
    fov.set_random_state(seed=3)
    sample = _sample(channels=3)
    out = fov(sample)
    inside = ~fov.outside(40, 40)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    assert inside.sum() == rows.size * cols.size  # an axis-aligned rectangle ...
    assert 19 <= rows.size <= 21 and 19 <= cols.size <= 21  # ... of half-size 0.5 * 20 pixels
    assert (rows[0] + rows[-1]) / 2 != 19.5 or (cols[0] + cols[-1]) / 2 != 19.5  # moved off centre
    assert np.all(out["image"][:, ~inside] == 0.0)  # -1024 HU: windowed air
    assert np.all(out["label"][0, ~inside] == 1.0) and np.all(out["label"][1:, ~inside] == 0.0)
    np.testing.assert_array_equal(out["image"][:, inside], sample["image"][:, inside])


def test_the_circle_is_round_in_mm_on_anisotropic_inputs():
    fov = RandFieldOfViewd(1.0, ["circle"], [1.0, 1.0], 0.0, [-1000], (-1000, 400), spacing_yx=(1.0, 2.0))
    fov.randomize()
    inside = ~fov.outside(40, 40)  # 40 mm tall, 80 mm wide: a circle of radius 20 mm
    assert np.flatnonzero(inside[19]).size == 20 and np.flatnonzero(inside[:, 19]).size == 40


def test_fill_values_are_drawn_from_the_list_and_the_same_seed_gives_the_same_sample():
    config = _fov(fill_hu=[-1024, -2000, -3024])
    fills = set()
    for seed in range(20):
        chain = train_transforms(config)
        chain.set_random_state(seed=seed)
        out = chain(_sample())
        again = train_transforms(config)
        again.set_random_state(seed=seed)
        torch.testing.assert_close(again(_sample()), out, rtol=0, atol=0)
        image, label = out["image"].numpy(), out["label"].numpy()
        cut = (label[0] == 0) & (_sample()["label"][0] == 1)  # lung before, background after: outside
        assert cut.any() and np.ptp(image[:, cut]) == 0  # one constant padding value
        fills.add(round(float(image[0, cut][0]), 4))
    assert fills == {round(v, 4) for v in (1076 / 2500, 100 / 2500, 0.0)}


def test_probability_zero_or_absent_is_the_identity():
    sample = _sample()
    fov = RandFieldOfViewd(0.0, ["circle"], [0.5, 0.5], 0.1, [-2000], (-1000, 400))
    assert fov(sample) is sample
    assert augment_transforms(_fov(prob=0.0)) == []
    assert config_view({}).augment.field_of_view is None
    without = {"data": {"window": WINDOW}, "augment": ALL_AUGMENT}
    for fov_spec in ({"prob": 0.0}, {"prob": 1.0}):
        plain, with_fov = train_transforms(without), train_transforms(
            {**without, "augment": {**ALL_AUGMENT, "field_of_view": fov_spec}})
        plain.set_random_state(seed=11)
        with_fov.set_random_state(seed=11)
        a, b = plain(_sample()), with_fov(_sample())
        if fov_spec["prob"] == 0.0:
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # bit-identical samples
        else:  # the other augmentations drew the same: inside the field nothing changed
            inside = ~with_fov.transforms[-2].outside(40, 40)
            assert 0 < inside.sum() < inside.size
            assert torch.equal(a["image"][:, inside], b["image"][:, inside])
            assert torch.equal(a["label"][:, inside], b["label"][:, inside])


def test_radius_in_mm_follows_the_spacing():
    mm = {"data": {"size": [40, 40], "spacing": 2.0}, "augment": {"field_of_view": {
        "prob": 1.0, "shapes": ["circle"], "radius_mm": [20, 20], "offset": 0.0}}}
    [fov] = augment_transforms(mm)  # a 80 mm field: 20 mm is half its half-width
    fov.randomize()
    yy, xx = np.mgrid[0:40, 0:40]
    np.testing.assert_array_equal(fov.outside(40, 40), np.hypot(yy - 19.5, xx - 19.5) > 10.0)
    with pytest.raises(ConfigError, match="radius_mm needs data.spacing"):
        augment_transforms(_fov(radius_mm=[100, 200]))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="augment.field_of_view.radius"):
        augment_transforms(_fov(radius=[1.0, 0.5]))
    with pytest.raises(ConfigError, match="augment.field_of_view.shapes"):
        augment_transforms(_fov(shapes=["hexagon"]))
    with pytest.raises(ConfigError, match="augment.field_of_view.fill_hu"):
        augment_transforms(_fov(fill_hu=[]))
    with pytest.raises(ConfigError, match="augment.field_of_view.radius_mm"):
        augment_transforms(_fov(radius_mm=[0, 100]))


def test_scale_translate_shifts_image_and_label_together():
    from monai.transforms import RandAffined, RandZoomd
    assert [type(t) for t in augment_transforms({"augment": {"scale": {"prob": 1.0}}})] == [RandZoomd]
    config = {"data": {"size": 48}, "augment": {"scale": {"prob": 1.0, "range": 0.0, "translate": 0.25}}}
    [shift] = augment_transforms(config)
    assert isinstance(shift, RandAffined)
    image = np.zeros((1, 48, 48), dtype=np.float32)
    image[0, 18:30, 18:30] = 0.7
    label = (image > 0).astype(np.float32)
    moves = set()
    for seed in range(5):
        shift.set_random_state(seed=seed)
        out = shift({"image": image, "label": label})
        img, lab = out["image"].numpy()[0], out["label"].numpy()[0]
        ys, xs = np.nonzero(img > 0.35)
        np.testing.assert_allclose(img, 0.7 * lab, atol=1e-5)  # the label moved with the image
        assert abs(ys.mean() - 23.5) <= 12 + 1e-6 and abs(xs.mean() - 23.5) <= 12 + 1e-6  # within 0.25 * 48
        moves.add((round(ys.mean()), round(xs.mean())))
    assert len(moves) > 1 and moves != {(24, 24)}
