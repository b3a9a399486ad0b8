"""The body mask and the post-processing step that keeps lung labels inside the patient.

The failure it guards against (issue 12, item 6): on a CT from another scanner the model labelled
the air between the patient's back and the table as lung, and keeping the two largest components
then dropped the real right lung base. Also: the phantom written as other scanners would.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
import yaml

from ctseg.body import body_mask
from ctseg.cli import main
from ctseg.errors import ConfigError
from ctseg.data.phantom import phantom_case, write_phantom_dataset
from ctseg.infer.export import (TEMPLATE_DIR, bundle_ctseg_config, bundle_scripts, inference_settings,
                                postprocess)
from ctseg.infer.postprocess import case_body, postprocess_labels, postprocess_steps
from ctseg.io import load_mask, load_series


def _table_rows(hu_yx: np.ndarray) -> np.ndarray:
    """Rows of one slice crossed by a table plate: most of the row above 150 HU (no body row is)."""
    return np.flatnonzero((hu_yx > 150).mean(axis=1) > 0.6)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_body_mask_of_the_phantom_excludes_the_table_and_the_air_under_the_back(index):
    hu, lungs, _ = phantom_case(np.random.default_rng([7, index]), 128, 128, 12)
    body = body_mask(hu)
    assert not (lungs.astype(bool) & ~body).any()  # lungs (and the dark trachea) are inside
    for z in (0, 6, 11):
        table = _table_rows(hu[z])
        assert table.size > 0 and not body[z, table].any()
        back = int(np.flatnonzero(body[z].any(axis=1)).max())  # the body's lowest row
        gap = np.arange(back + 1, int(table.min()))  # rows between the body and the table
        assert gap.size > 0 and (hu[z, gap] < -700).all(axis=0).any()  # hold air, not body


def test_body_mask_keeps_lungs_that_the_field_of_view_cuts():
    """2.2 mm x 96 pixels: 211 mm across, narrower than any phantom body or pair of lungs."""
    cut = 0
    for index in range(4):
        hu, lungs, _ = phantom_case(np.random.default_rng([3, index]), 96, 96, 8, pixel_spacing=2.2)
        lungs = lungs.astype(bool)
        cut += int(lungs[:, :, [0, -1]].any())
        assert body_mask(hu)[lungs].all()
    assert cut > 0  # lungs reached the image edge


def test_body_mask_of_air_only_is_empty():
    assert not body_mask(np.full((3, 8, 8), -1000.0, np.float32)).any()


def _back_and_table_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU with a body (two lungs inside), a table below its back and air between; the network's
    labels: both lungs plus a blob in the air under the back, larger than either lung."""
    z, y, x = np.mgrid[0:10, 0:80, 0:96]
    hu = np.full(z.shape, -1000.0, np.float32)
    body = ((x - 48) / 40.0) ** 2 + ((y - 32) / 24.0) ** 2 < 1
    hu[body] = 40.0
    right = ((x - 30) / 11.0) ** 2 + ((y - 32) / 15.0) ** 2 < 1  # patient's right: image left
    left = ((x - 66) / 10.0) ** 2 + ((y - 32) / 14.0) ** 2 < 1
    hu[right | left] = -850.0
    hu[(y >= 66) & (y < 69)] = 200.0  # the table, separated from the back (row 55) by air
    blob = (y > 56) & (y < 65)  # the air between back and table, mistaken for lung
    labels = (right | left | blob).astype(np.uint8)
    assert blob.sum() > right.sum() > left.sum()
    return hu, labels, right | left


def test_body_step_keeps_the_lungs_that_air_under_the_back_would_displace():
    hu, labels, lungs = _back_and_table_case()
    steps = postprocess_steps({}, 2)
    without = postprocess_labels(labels, steps)
    assert not without[lungs & (np.arange(96) > 48)].any()  # the smaller lung is lost ...
    with_body = postprocess_labels(labels, steps, case_body({}, hu))
    np.testing.assert_array_equal(with_body.astype(bool), lungs)  # ... unless the body step runs
    assert case_body({"infer": {"body_mask": False}}, hu) is None
    assert case_body({"infer": {"postprocess": {"enabled": False}}}, hu) is None


def test_bundle_body_transforms_equal_ctseg_post_processing(tmp_path):
    """The vendored BodyMaskd + RestrictToBodyd and the box of MONAI steps, as the exported
    inference.yaml chains them, give `postprocess_labels` with the body step, voxel for voxel."""
    for name, text in bundle_scripts().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert (tmp_path / "scripts/body.py").is_file()
    config = {"data": {"num_classes": 2}, "infer": {"body_mask": True}}
    chain = postprocess(config)
    assert chain[0]["_target_"] == "scripts.transforms.RestrictToBodyd"
    template = yaml.safe_load((TEMPLATE_DIR / "configs/inference.yaml").read_text())
    for body in (True, False):
        ctseg_config = bundle_ctseg_config({"infer": {"body_mask": body}})
        spec = {"name": "unet", "in_channels": 1, "out_channels": 1}
        settings = inference_settings(template, spec, ctseg_config)
        targets = [t["_target_"] for t in settings["preprocessing"]["transforms"]]
        post = [t["_target_"] for t in settings["postprocessing"]["transforms"]]
        assert (targets[1] == "scripts.transforms.BodyMaskd") is body  # right after loading the HU
        assert ("scripts.transforms.RestrictToBodyd" in post) is body
    hu, labels, _ = _back_and_table_case()
    sys.path.insert(0, str(tmp_path))
    try:
        scripts = importlib.import_module("scripts.transforms")
        from monai import transforms as mt
        sample = scripts.BodyMaskd("image", body_key="body")(
            {"image": torch.from_numpy(hu.transpose(2, 1, 0).copy())[None],
             "pred": torch.from_numpy(labels.transpose(2, 1, 0).copy())[None]})
        sample = scripts.RestrictToBodyd("pred", body_key="body")(sample)
        steps = postprocess_steps(config, 2)
        out = scripts.InForegroundBoxd("pred", [getattr(mt, n)(**kw) for n, kw in steps])(sample)["pred"]
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    expected = postprocess_labels(labels, steps, case_body(config, hu))
    np.testing.assert_array_equal(out[0].numpy().transpose(2, 1, 0), expected)


def test_phantom_at_other_scanners_spacings_loads_back_with_lungs_of_the_same_size(tmp_path):
    """Same anatomy sampled at 0.75, 1.5 and 3 mm (a 384 mm field of view), lung bases only."""
    volumes = {}
    for spacing, size in ((0.75, 512), (1.5, 256), (3.0, 128)):
        root = write_phantom_dataset(tmp_path / f"p{spacing}", n_cases=1, seed=5, rows=size, cols=size,
                                     slices=6, pixel_spacing=spacing, z_range=(0.2, 0.45))
        volume = load_series(root / "Images" / "Phantom_000")
        mask = load_mask(root / "Segmentations" / "Phantom_000_seg.npz", volume)
        in_plane = np.linalg.norm(volume.affine[:3, :2], axis=0)
        np.testing.assert_allclose(in_plane, [spacing, spacing], rtol=1e-6)
        assert volume.shape == (6, size, size)
        assert mask[-1].any()  # the last slice cuts through the lungs: bases only
        voxel_ml = float(np.prod(np.linalg.norm(volume.affine[:3, :3], axis=0))) / 1000
        volumes[spacing] = mask.sum() * voxel_ml
        assert body_mask(volume.array)[mask.astype(bool)].all()
    assert volumes[3.0] == pytest.approx(volumes[0.75], rel=0.03)
    assert volumes[1.5] == pytest.approx(volumes[0.75], rel=0.03)


def test_phantom_refuses_impossible_scanner_settings(tmp_path):
    with pytest.raises(ConfigError, match="z_range"):
        phantom_case(np.random.default_rng(0), 16, 16, 4, z_range=(0.5, 0.2))
    with pytest.raises(ConfigError, match="pixel_spacing"):
        phantom_case(np.random.default_rng(0), 16, 16, 4, pixel_spacing=0.0)
    assert main(["phantom", str(tmp_path / "out"), "--z-range", "0.5", "0.2"]) == 2
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_ctseg_phantom_writes_another_scanners_geometry(tmp_path):
    out = tmp_path / "scanner"
    assert main(["phantom", str(out), "--cases", "1", "--size", "48", "--slices", "4",
                 "--pixel-spacing", "3", "--z-range", "0.2", "0.5"]) == 0
    volume = load_series(out / "Images" / "Phantom_000")
    assert volume.shape == (4, 48, 48)
    np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :2], axis=0), [3.0, 3.0])
