"""`data.spacing`: the network sees a fixed physical field of view whatever the source spacing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from ctseg.cli import main
from ctseg.config import resolve_config
from ctseg.data.cache import cache_case, preprocessing_settings
from ctseg.data.cases import discover_cases
from ctseg.data.dataset import context_slices, stack_context
from ctseg.errors import ConfigError, ModelError
from ctseg.geometry import AIR_HU, Box, body_centre, crop_or_pad, fov_box, uncrop
from ctseg.infer import Segmenter
from ctseg.infer.volume import field_of_view, predict_volume, preprocess_volume
from ctseg.io import load_image
from ctseg.transforms import preprocess_transforms

SIZE = [128, 128]
CONFIG = {"data": {"size": SIZE, "window": [-1000, 400], "spacing": 2.0}, "infer": {"batch_size": 4}}
NULL = {"data": {"size": SIZE, "window": [-1000, 400]}, "infer": {"batch_size": 4}}


class WindowThreshold(nn.Module):
    """A fixed 'network': logit = 40 * (windowed input - 0.5), i.e. HU above the window centre."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x - 0.5)


def body(spacing: float, pixels: int, slices: int = 3) -> np.ndarray:
    """(z, y, x) HU: air with a 200 x 140 mm soft-tissue ellipse 30 mm right of and 20 mm below
    the image centre, sampled at `spacing` mm on a `pixels`-square grid (its own field of view)."""
    c = (np.arange(pixels) - (pixels - 1) / 2) * spacing
    y, x = c[:, None], c[None, :]
    inside = ((x - 30) / 100) ** 2 + ((y - 20) / 70) ** 2 < 1
    return np.broadcast_to(np.where(inside, 40.0, -1000.0).astype(np.float32), (slices, pixels, pixels)).copy()


def extent(image_hw: np.ndarray) -> tuple[int, int]:
    """(rows, cols) the windowed body covers in network pixels (half the tissue value)."""
    inside = image_hw > 0.5 * image_hw.max()
    return int(inside.any(axis=1).sum()), int(inside.any(axis=0).sum())


def test_two_source_spacings_give_inputs_of_one_physical_scale():
    # 0.7 mm x 512 px (358 mm field) and 1.4 mm x 320 px (448 mm): the same body
    fine, coarse = body(0.7, 512), body(1.4, 320)
    scaled = [extent(preprocess_volume(v, CONFIG, spacing_yx=(s, s))[1, 0].numpy())
              for v, s in ((fine, 0.7), (coarse, 1.4))]
    for rows, cols in scaled:  # 140 x 200 mm at 2 mm per network pixel
        assert abs(rows - 70) <= 2 and abs(cols - 100) <= 2
    assert abs(scaled[0][0] - scaled[1][0]) <= 2 and abs(scaled[0][1] - scaled[1][1]) <= 2
    for volume, s in ((fine, 0.7), (coarse, 1.4)):
        box = field_of_view(volume, CONFIG, (s, s))
        assert box.rows * s / SIZE[0] == pytest.approx(2.0, rel=0.005)
        assert box.cols * s / SIZE[1] == pytest.approx(2.0, rel=0.005)
    # resized by pixel count (data.spacing null) the same body has two scales
    plain = [extent(preprocess_volume(v, NULL)[1, 0].numpy()) for v in (fine, coarse)]
    assert plain[0][1] - plain[1][1] > 10


def test_labels_come_back_on_the_original_grid_background_outside_the_box():
    hu = body(1.4, 320)
    labels, probs = predict_volume(WindowThreshold(), hu, CONFIG, "cpu", spacing_yx=(1.4, 1.4))
    assert labels.shape == hu.shape and probs.shape == (2, *hu.shape)
    truth = hu > -300
    assert np.mean(labels == truth) > 0.99
    # a 256 mm field around the body: pixels beyond it are background with certainty
    box = field_of_view(hu, CONFIG, (1.4, 1.4))
    outside = np.ones(hu.shape[1:], dtype=bool)
    outside[max(box.y0, 0): box.y0 + box.rows, max(box.x0, 0): box.x0 + box.cols] = False
    assert outside.any()
    assert np.all(probs[0][:, outside] == 1.0) and np.all(probs[1][:, outside] == 0.0)


@pytest.mark.parametrize("box", [Box(-5, -7, 20, 30), Box(3, 4, 5, 6), Box(10, 20, 40, 40), Box(-50, 0, 10, 10)])
def test_crop_or_pad_then_uncrop_is_the_identity_on_the_covered_region(box):
    volume = np.random.default_rng(0).normal(size=(2, 3, 25, 31)).astype(np.float32)
    cropped = crop_or_pad(volume, box, -7.0)
    assert cropped.shape == (2, 3, box.rows, box.cols)
    back = uncrop(cropped, box, (25, 31), (1.0, 0.0))
    covered = np.zeros((25, 31), dtype=bool)
    covered[max(box.y0, 0): max(box.y0 + box.rows, 0), max(box.x0, 0): max(box.x0 + box.cols, 0)] = True
    np.testing.assert_array_equal(back[:, :, covered], volume[:, :, covered])
    assert np.all(back[0][:, ~covered] == 1.0) and np.all(back[1][:, ~covered] == 0.0)
    ys, xs = np.arange(box.y0, box.y0 + box.rows), np.arange(box.x0, box.x0 + box.cols)
    in_image = ((ys >= 0) & (ys < 25))[:, None] & ((xs >= 0) & (xs < 31))[None, :]
    assert np.all(cropped[..., ~in_image] == -7.0)  # the fill only where the box leaves the image


def test_a_larger_volume_is_cropped_around_the_body_not_the_image_centre():
    hu = np.full((4, 200, 200), AIR_HU, dtype=np.float32)
    hu[1:3, 30:71, 120:171] = 40.0  # body off-centre, only in some slices
    hu[0, 100, 100] = -700.0  # lung-like values are not body
    assert body_centre(hu) == (50.0, 145.0)
    box = fov_box(hu, (1.0, 1.0), (1.0, 1.0), (61, 61))
    assert box == Box(20, 115, 61, 61)
    cropped = crop_or_pad(hu, box, AIR_HU)
    assert np.count_nonzero(cropped > 0) == np.count_nonzero(hu > 0)  # the whole body is in the box
    empty = np.full((1, 20, 30), AIR_HU, dtype=np.float32)
    assert fov_box(empty, (1.0, 1.0), (1.0, 1.0), (10, 10)) == Box(5, 10, 10, 10)  # no body: image centre


def test_null_spacing_is_the_old_path_exactly():
    hu = body(1.4, 96)
    old = stack_context(torch.as_tensor(np.asarray(preprocess_transforms(NULL, ("image",))(
        {"image": torch.from_numpy(hu.copy())})["image"]), dtype=torch.float32), context_slices(NULL))
    new = preprocess_volume(hu, NULL)
    assert torch.equal(new, old)
    assert field_of_view(hu, NULL, None) is None
    with_spacing = predict_volume(WindowThreshold(), hu, NULL, "cpu", spacing_yx=(1.4, 1.4))
    without = predict_volume(WindowThreshold(), hu, NULL, "cpu")
    np.testing.assert_array_equal(with_spacing[0], without[0])
    np.testing.assert_array_equal(with_spacing[1], without[1])


def test_a_spacing_model_needs_the_source_spacing():
    with pytest.raises(ModelError, match="spacing"):
        predict_volume(WindowThreshold(), body(1.4, 64), CONFIG, "cpu")
    with pytest.raises(ValueError, match="spacing"):
        fov_box(body(1.4, 64), (0.0, 1.0), (2.0, 2.0), (32, 32))


@pytest.mark.parametrize("value", [2.0, 1, [0.8, 1.2]])
def test_config_accepts_a_spacing(value):
    assert resolve_config({"data": {"spacing": value}})["data"]["spacing"] == value


@pytest.mark.parametrize("value", [0, -1.0, "2", [1.0, 2.0, 3.0], [1.0, 0]])
def test_config_refuses_a_bad_spacing(value):
    with pytest.raises(ConfigError, match="data.spacing"):
        resolve_config({"data": {"spacing": value}})


def test_cache_key_follows_the_spacing_and_training_sees_what_inference_sees(phantom_dir, tmp_path):
    case = discover_cases(phantom_dir)[0]
    null = {"data": {"size": [32, 32], "cache_dir": str(tmp_path)}}
    spaced = {"data": {"size": [32, 32], "spacing": 9.0, "cache_dir": str(tmp_path)}}
    assert preprocessing_settings(null) != preprocessing_settings(spaced)
    a, b = cache_case(case, null, tmp_path), cache_case(case, spaced, tmp_path)
    assert a.path == b.path and a.train_path != b.train_path
    assert a.train_image.shape == b.train_image.shape == (a.shape[0], 32, 32)
    expected = preprocess_volume(b.hu, spaced, spacing_yx=b.spacing[1:])[:, 0].numpy()
    np.testing.assert_array_equal(b.train_image, expected)
    assert b.train_label.shape == (a.shape[0], 1, 32, 32) and float(np.max(b.train_label)) > 0.5
    box = fov_box(np.asarray(b.hu), b.spacing[1:], (9.0, 9.0), (32, 32))
    assert box.rows != a.shape[1]  # the field of view is not the image: this case was cropped or padded


def test_bundle_writes_the_masks_of_ctseg_predict_with_a_spacing(phantom_dir, tmp_path):
    from ctseg.train import train

    from infer_helpers import TINY_CONFIG, run_bundle_inference

    # the phantom's 64 px at ~6.4 mm: a 320 mm field crops its sides
    config = {**TINY_CONFIG, "data": {"size": [32, 32], "spacing": 10.0, "cache_dir": str(tmp_path / "cache")},
              "train": {**TINY_CONFIG["train"], "epochs": 2}}
    run = train(config, phantom_dir, tmp_path / "run", device="cpu")
    bundle, expected, out = tmp_path / "bundle", tmp_path / "expected", tmp_path / "masks"
    assert main(["export-bundle", str(run), "--output", str(bundle)]) == 0
    steps = {t["_target_"]: t for t in yaml.safe_load((bundle / "configs/inference.yaml").read_text())
             ["preprocessing"]["transforms"]}
    assert steps["scripts.transforms.FieldOfViewd"]["spacing"] == 10.0
    assert (bundle / "scripts" / "geometry.py").is_file()
    assert main(["predict", "--model", str(run), "--input", str(phantom_dir), "--output", str(expected)]) == 0
    run_bundle_inference(bundle, phantom_dir, out)
    for case in ("Phantom_000", "Phantom_001", "Phantom_002"):
        assert (out / f"{case}.nii.gz").read_bytes() == (expected / f"{case}.nii.gz").read_bytes(), case
    assert sum(np.count_nonzero(nib.load(out / f"{c}.nii.gz").dataobj)
               for c in ("Phantom_000", "Phantom_001", "Phantom_002")) > 0

    # the Python API reads the spacing from a CTVolume, or from an array's affine
    segmenter = Segmenter.load(run, device="cpu")
    volume = load_image(phantom_dir / "Images" / "Phantom_000")
    np.testing.assert_array_equal(segmenter(volume.array, volume.affine), segmenter(volume))
    with pytest.raises(ModelError, match="spacing"):
        segmenter(volume.array)
