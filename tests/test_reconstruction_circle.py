"""A scan reconstructed in a circle with a scanner's padding value outside it (issue 12, item 6).

The phantom writes one (`reconstruction_radius`, `padding_hu`); the body mask and the field of
view must read the padding as outside the patient, and `ctseg predict` must still find the lungs.
"""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from ctseg.body import body_mask
from ctseg.cli import main
from ctseg.data.phantom import phantom_case, write_phantom_dataset
from ctseg.errors import ConfigError
from ctseg.geometry import fov_box
from ctseg.io import load_image
from ctseg.io.masks import load_mask


def _outside_circle(rows: int, cols: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols]
    return np.hypot(yy - (rows - 1) / 2, xx - (cols - 1) / 2) > radius * min(rows, cols)


def test_phantom_defaults_are_unchanged_and_the_circle_only_adds_padding():
    hu, lungs, geometry = phantom_case(np.random.default_rng([3, 0]), 32, 32, 6)
    # digest of the default phantom before the reconstruction circle existed (main, issue 12)
    assert hashlib.sha256(hu.tobytes() + lungs.tobytes()).hexdigest() == \
        "c9316e6a77310f9cb01df9201ad354aaa8bf95b8f8b1fc766660695c10eb9f5e"
    hu_c, lungs_c, geometry_c = phantom_case(np.random.default_rng([3, 0]), 32, 32, 6,
                                             reconstruction_radius=0.2, padding_hu=-3024.0)
    outside = _outside_circle(32, 32, 0.2)
    assert geometry_c == geometry
    np.testing.assert_array_equal(hu_c[:, ~outside], hu[:, ~outside])
    assert np.all(hu_c[:, outside] == -3024.0)
    np.testing.assert_array_equal(lungs_c[:, ~outside], lungs[:, ~outside])
    assert lungs[:, outside].any() and not lungs_c[:, outside].any()  # cut lungs are not labelled
    with pytest.raises(ConfigError, match="reconstruction_radius"):
        phantom_case(np.random.default_rng(0), 16, 16, 4, reconstruction_radius=0.9)
    with pytest.raises(ConfigError, match="padding_hu"):
        phantom_case(np.random.default_rng(0), 16, 16, 4, reconstruction_radius=0.4, padding_hu=0.0)


def test_ctseg_phantom_writes_the_padding_into_the_dicom(tmp_path):
    plain = write_phantom_dataset(tmp_path / "plain", n_cases=1, seed=2, rows=48, cols=48, slices=4)
    assert main(["phantom", str(tmp_path / "circle"), "--cases", "1", "--seed", "2", "--size", "48",
                 "--slices", "4", "--reconstruction-radius", "0.45", "--padding-hu", "-2000"]) == 0
    a = load_image(plain / "Images" / "Phantom_000").array
    b = load_image(tmp_path / "circle" / "Images" / "Phantom_000").array
    outside = _outside_circle(48, 48, 0.45)
    assert np.all(b[:, outside] == -2000.0)  # stored below the intercept's -1024, read back exactly
    np.testing.assert_array_equal(b[:, ~outside], a[:, ~outside])
    assert main(["phantom", str(tmp_path / "bad"), "--reconstruction-radius", "2"]) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_body_mask_and_field_of_view_read_the_padding_as_outside(seed):
    hu, lungs, geometry = phantom_case(np.random.default_rng([seed, 0]), 128, 128, 16)
    plain_body = body_mask(hu)
    for radius, padding in ((0.45, -2000.0), (0.3, -3024.0)):  # 0.3 cuts the body and a lung
        cut, cut_lungs, _ = phantom_case(np.random.default_rng([seed, 0]), 128, 128, 16,
                                         reconstruction_radius=radius, padding_hu=padding)
        body = body_mask(cut)
        assert not body[cut < -1500].any()  # no padding is body ...
        assert not (body & ~plain_body).any()  # ... nor the air around the patient
        assert body[cut_lungs > 0].mean() > 0.99  # the lungs the field cut stay inside the body
        if radius == 0.45:  # the circle misses the body: nothing changes
            np.testing.assert_array_equal(body, plain_body)
        spacing, air = (geometry.pixel_spacing,) * 2, np.where(cut < -1500, -1000.0, cut)
        assert fov_box(cut, spacing, (2.0, 2.0), (96, 96)) == fov_box(air, spacing, (2.0, 2.0), (96, 96))


def test_predict_finds_the_lungs_inside_a_reconstruction_circle_and_nothing_outside(tmp_path):
    """The shipped model; 0.45 misses the body, 0.3 cuts the chest wall and a lung."""
    for radius, padding in ((0.45, -2000.0), (0.3, -3024.0)):
        root = write_phantom_dataset(tmp_path / f"r{radius}", n_cases=2, seed=0, rows=128, cols=128,
                                     slices=16, reconstruction_radius=radius, padding_hu=padding)
        out = tmp_path / f"masks{radius}"
        assert main(["predict", "--input", str(root / "Images"), "--output", str(out)]) == 0
        for case in ("Phantom_000", "Phantom_001"):
            volume = load_image(root / "Images" / case)
            truth = load_mask(root / "Segmentations" / f"{case}_seg.npz", volume) > 0
            found = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj).transpose(2, 1, 0) > 0
            assert found.shape == truth.shape
            assert not found[volume.array < -1500].any()
            assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.93, (radius, case)
