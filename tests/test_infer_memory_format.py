"""Channels-last input on CPU (chosen for speed) gives the masks the plain NCHW layout gives."""

from __future__ import annotations

import numpy as np
import pytest

from ctseg.infer import volume
from ctseg.infer.model_loader import load_model
from ctseg.io import load_image

from infer_helpers import tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantom_dir):
    return tiny_run(tmp_path_factory, phantom_dir)


def test_channels_last_on_cpu_gives_the_nchw_masks(run_dir, phantom_dir, monkeypatch):
    assert "cpu" in volume.CHANNELS_LAST
    loaded = load_model(run_dir, device="cpu")
    for case in ("Phantom_000", "Phantom_001", "Phantom_002"):
        hu = load_image(phantom_dir / "Images" / case).array
        fast, _ = volume.predict_volume(loaded.model, hu, loaded.config, "cpu", probabilities=False)
        with monkeypatch.context() as patch:
            patch.setattr(volume, "CHANNELS_LAST", ())
            plain, _ = volume.predict_volume(loaded.model, hu, loaded.config, "cpu", probabilities=False)
        assert np.count_nonzero(plain) > 0
        np.testing.assert_array_equal(fast, plain)
