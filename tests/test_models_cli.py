"""`ctseg models` and the report behind it, on tiny widths and slices."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ctseg.cli import main
from ctseg.networks import build_network, list_networks
from ctseg.networks.report import activation_bytes, count_layers, network_report

KEYS = {"name", "variant", "layers", "params", "param_mb", "activation_mb", "cpu_ms_per_slice"}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads; on shared cores they only cost time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_activation_bytes_sums_leaf_outputs_once() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Identity(), nn.ReLU())
    # conv and ReLU outputs: 2 channels x 4 x 4 float32 each; Identity aliases its input
    assert activation_bytes(model, torch.randn(1, 1, 4, 4)) == 2 * (2 * 16 * 4)


def test_network_report_rows() -> None:
    rows = network_report(names=["unet", "unet_ra"], in_channels=2, features=(8, 16), size=32,
                          repeats=1)
    assert [r["name"] for r in rows] == ["unet", "unet_ra"]
    for row in rows:
        assert KEYS <= set(row)
        params = sum(p.numel() for p in build_network(row["name"], 2, 1, (8, 16)).parameters())
        assert row["params"] == row["trainable_params"] == params
        assert row["param_mb"] == round(params * 4 / 2**20, 2)
        assert row["activation_mb"] > 0 and row["cpu_ms_per_slice"] > 0
        assert row["input_shape"] == [1, 2, 32, 32]
    assert rows[1]["activation_mb"] > rows[0]["activation_mb"]  # the gates add activations


def test_cli_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--features", "8,16", "--size", "32", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_networks()
    assert all(KEYS <= set(r) for r in rows)


def test_cli_models_thesis_variant_gives_the_study_table(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The study's Table 2 (3 input channels, features 64..512): parameters and layers."""
    assert main(["models", "--variant", "thesis", "--in-channels", "3", "--features",
                 "64,128,256,512", "--size", "16", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["variant"], r["params"], r["layers"]) for r in rows] == [
        ("unet", "thesis", 31_037_633, 72), ("unet_spconv", "thesis", 13_025_357, 199),
        ("unet_ra", "thesis", 31_037_633, 72), ("unet_mcnet", "thesis", 77_414_275, 200)]


def test_count_layers_skips_containers_and_pass_throughs() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Identity(),
                          nn.Sequential(nn.ReLU(), nn.BatchNorm2d(2)))
    assert count_layers(model, torch.randn(2, 1, 4, 4)) == 3  # conv, ReLU, BN


def test_cli_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--in-channels", "3", "--features", "8,16", "--size", "16",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "input 1x3x16x16" in out
    assert all(name in out for name in list_networks())


def test_cli_models_refuses_widths_spconv_cannot_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--features", "6,12", "--size", "16", "--repeats", "1"]) == 2
    assert "unet_spconv" in capsys.readouterr().err


def test_cli_models_rejects_non_integer_features() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["models", "--features", "64,abc"])
    assert exc.value.code == 2
