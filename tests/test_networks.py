"""The network family: fidelity counts, shapes, gradients, learning, MONAI and export compatibility.

Everything runs on tiny widths (8, 16, 32) and small slices so the file stays fast on shared CPUs;
only the parameter-count tests build full-width networks, and they never run them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SliceInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from torch import nn

from ctseg.errors import ConfigError, ModelError
from ctseg.networks import build_network, list_networks
from ctseg.networks.attention import ResidualAttention, parameter_free_attention
from ctseg.networks.blocks import DoubleConv, conv3x3
from ctseg.networks.cie import CIE, ThesisCIE
from ctseg.networks.conv_module import ConvModule
from ctseg.networks.mfe import MFE, SplitMFE, branch_widths
from ctseg.networks.report import count_layers
from ctseg.networks.spconv import SPConv

NAMES = ["unet", "unet_spconv", "unet_ra", "unet_mcnet"]
# every network of both variants; the thesis unet is the default one (tested below), not repeated
VERSIONS = [(n, "default") for n in NAMES] + [(n, "thesis") for n in NAMES[1:]]
VERSION_IDS = [f"{v}-{n}" for n, v in VERSIONS]
TINY = (8, 16, 32)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on shared cores OpenMP threads that
    wait for each other slow these tests down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny(name: str, in_channels: int = 1, out_channels: int = 2,
         variant: str = "default") -> nn.Module:
    torch.manual_seed(0)
    return build_network(name, in_channels, out_channels, features=TINY, variant=variant)


def test_registry_names() -> None:
    assert list_networks() == NAMES


# --- fidelity counts -------------------------------------------------------------------------

def test_unet_parameter_count_matches_study() -> None:
    assert n_params(build_network("unet", 3, 1, features=(64, 128, 256, 512))) == 31_037_633
    assert n_params(build_network("unet", 3, 1)) == 31_037_633  # the default features


STUDY_ARGS = dict(in_channels=3, out_channels=1, features=(64, 128, 256, 512))


@pytest.mark.parametrize("variant, counts", [
    ("default", [31_037_633, 13_025_921, 31_562_281, 48_354_927]),
    ("thesis", [31_037_633, 13_025_357, 31_037_633, 77_414_275]),  # the study's Table 2
])
def test_parameter_counts_of_both_variants(variant: str, counts: list[int]) -> None:
    assert [n_params(build_network(n, variant=variant, **STUDY_ARGS)) for n in NAMES] == counts


def test_thesis_layer_counts_match_the_study() -> None:
    x = torch.zeros(1, 3, 16, 16)
    layers = [count_layers(build_network(n, variant="thesis", **STUDY_ARGS).eval(), x)
              for n in NAMES]
    assert layers == [72, 199, 72, 200]


def test_thesis_unet_is_the_default_unet() -> None:
    default, thesis = tiny("unet"), tiny("unet", variant="thesis")
    assert {k: v.shape for k, v in default.state_dict().items()} == \
        {k: v.shape for k, v in thesis.state_dict().items()}


def test_thesis_ra_has_no_weights_but_gates_the_skips() -> None:
    """ver4 thesis = ver1's weights exactly; with the same weights, its output still differs."""
    unet, ra = tiny("unet").eval(), tiny("unet_ra", variant="thesis").eval()
    ra.load_state_dict(unet.state_dict())  # strict: the same parameters and buffers
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(unet(x), ra(x))
    skip = torch.rand(2, 8, 9, 7) + 0.1
    out = parameter_free_attention(skip, torch.randn(2, 16, 4, 3))
    assert out.shape == skip.shape and torch.all(out > skip) and torch.all(out < 2 * skip)


def test_thesis_spconv_lifts_with_a_bias_free_1x1_and_uses_spconv_everywhere() -> None:
    model = build_network("unet_spconv", 3, 1, features=TINY, variant="thesis")
    assert isinstance(model.lift, nn.Conv2d) and model.lift.bias is None
    lift = model.lift
    assert (lift.in_channels, lift.out_channels, lift.kernel_size) == (3, 4, (1, 1))
    assert isinstance(model.encoder[0].block[0], SPConv)
    assert sum(isinstance(m, SPConv) for m in model.modules()) == 2 * (2 * len(TINY) + 1)
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.groups == 1
                   for m in model.modules())  # every 3x3 is an SPConv's group-wise conv


def test_thesis_mcnet_has_conv_modules_in_encoder_and_decoder() -> None:
    model = build_network("unet_mcnet", 3, 1, features=TINY, variant="thesis")
    assert all(isinstance(b, ConvModule) and isinstance(b.cie, ThesisCIE)
               and isinstance(b.mfe, SplitMFE) for b in [*model.encoder, *model.decoder])
    assert isinstance(model.bottleneck, DoubleConv)
    assert not any(isinstance(m, nn.BatchNorm2d) for b in model.encoder
                   for part in (b.cie, b.mfe) for m in part.modules())
    assert all(m.bias is not None for b in model.encoder for part in (b.cie, b.mfe)
               for m in part.modules() if isinstance(m, nn.Conv2d))


def test_split_mfe_gives_each_branch_its_share_of_the_input_channels() -> None:
    """torch.split into 1/4, 1/8, 1/2, 1/8 of the input, one part per branch; the fusing conv
    outputs one channel, added to every input channel."""
    mfe = SplitMFE(64).eval()
    assert mfe.widths == [16, 8, 32, 8]
    seen: dict[str, torch.Tensor] = {}
    for name, module in [("b1", mfe.branch1), ("b2", mfe.pool), ("b3", mfe.branch3[0]),
                         ("b4", mfe.branch4[0])]:
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0]))
    x = torch.randn(2, 64, 9, 7)
    with torch.no_grad():
        out = mfe(x)
    for name, (lo, hi) in {"b1": (0, 16), "b2": (16, 24), "b3": (24, 56), "b4": (56, 64)}.items():
        assert torch.equal(seen[name], x[:, lo:hi]), name
    assert mfe.smooth.out_channels == 1
    added = out - x
    torch.testing.assert_close(added, added[:, :1].expand_as(added))


def test_spconv_parameter_count() -> None:
    assert n_params(SPConv(64, 64)) == 13_632
    assert n_params(conv3x3(64, 64)) == 36_864


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_at_full_width(name: str) -> None:
    model = build_network(name, 1, 1)
    assert n_params(model) > 1_000_000


# --- blocks ----------------------------------------------------------------------------------

def test_spconv_stride_two_halves_odd_sizes_like_a_strided_conv() -> None:
    x = torch.randn(2, 8, 15, 12)
    out = SPConv(8, 12, stride=2).eval()(x)
    assert out.shape == nn.Conv2d(8, 12, 3, stride=2, padding=1)(x).shape == (2, 12, 8, 6)


def test_spconv_fuses_branches_with_softmax_weights() -> None:
    torch.manual_seed(0)
    spconv = SPConv(8, 4).eval()
    x = torch.randn(1, 8, 6, 6)
    rep = spconv.bn_rep(spconv.gwc(x[:, :4]) + spconv.pwc(x[:, :4]))
    red = spconv.bn_red(spconv.conv1x1(x[:, 4:]))
    beta = torch.sigmoid(rep.mean((2, 3)) - red.mean((2, 3)))[..., None, None]
    torch.testing.assert_close(spconv(x), beta * rep + (1 - beta) * red)


@pytest.mark.parametrize("in_channels, out_channels, alpha, message", [
    (6, 8, 0.5, "must be even"),        # representative part 3: odd
    (2, 8, 0.5, "must be even and >= 2"),  # representative part 1
    (8, 7, 0.5, "C_out = 7 must be even"),
    (8, 8, 1.0, "alpha must lie strictly between 0 and 1"),
    (8, 8, 0.0, "alpha must lie strictly between 0 and 1"),
])
def test_spconv_constraints_raise_config_error(in_channels: int, out_channels: int, alpha: float,
                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SPConv(in_channels, out_channels, alpha=alpha)


def test_unet_spconv_refuses_widths_spconv_cannot_split() -> None:
    with pytest.raises(ConfigError, match=r"unet_spconv: SPConv\(6 -> 6.*must be even"):
        build_network("unet_spconv", 1, 1, features=(6, 12))


def test_unet_spconv_lifts_the_slice_with_a_plain_conv() -> None:
    model = build_network("unet_spconv", 1, 1, features=TINY)
    first = model.encoder[0].block
    assert isinstance(first[0], nn.Conv2d) and isinstance(first[3], SPConv)
    assert sum(isinstance(m, SPConv) for m in model.modules()) == 2 * (2 * len(TINY) + 1) - 1


def test_mfe_branch_widths_and_lift() -> None:
    assert branch_widths(8) == (2, 1, 4, 1)
    assert branch_widths(64) == (16, 8, 32, 8)
    assert sum(branch_widths(12)) == 12
    mfe = MFE(4)  # lifted to 8 inside, back to 4 for the residual add
    assert mfe.branch4[0][0].in_channels == 8
    assert mfe(torch.randn(2, 4, 9, 7)).shape == (2, 4, 9, 7)
    assert isinstance(MFE(16).lift, nn.Identity)


def test_cie_keeps_shape_with_dilated_branches() -> None:
    cie = CIE(4)
    assert [b[0].dilation for b in cie.branches] == [(2, 2), (6, 6), (10, 10)]
    assert cie(torch.randn(2, 4, 11, 13)).shape == (2, 4, 11, 13)


def test_conv_module_changes_width_like_double_conv() -> None:
    block = ConvModule(4, 8)
    assert [type(m) for m in block.children()] == [CIE, DoubleConv, MFE]
    assert block(torch.randn(2, 4, 10, 10)).shape == (2, 8, 10, 10)


def test_residual_attention_only_amplifies_the_skip() -> None:
    gate = ResidualAttention(8, 16).eval()
    assert gate.project_x[0].out_channels == 4  # C_int = C_x / 2
    x = torch.rand(1, 8, 9, 7) + 0.1
    out = gate(x, torch.randn(1, 16, 4, 3))
    assert out.shape == x.shape
    assert torch.all(out > x) and torch.all(out < 2 * x)  # x * (1 + alpha), alpha in (0, 1)


# --- registry errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(name="vnet"), "unknown network 'vnet'"),
    (dict(name="unet", alpha=0.5),
     r"unet \(default\): unknown option\(s\) alpha \(accepted: none\)"),
    (dict(name="unet_ra", variant="thesis", attention_ratio=0.5),
     r"unet_ra \(thesis\): unknown option\(s\) attention_ratio \(accepted: none\)"),
    (dict(name="unet", variant="paper"), "unet: unknown variant 'paper'"),
    (dict(name="unet_mcnet", variant="thesis", features=[4, 8]), r"SplitMFE\(4\): needs >= 8"),
    (dict(name="unet_ra", dropout=0.1), r"accepted: attention_ratio"),
    (dict(name="unet_spconv", alpha="half"), "option alpha must be a number"),
    (dict(name="unet", features=[]), "features must be a non-empty list"),
    (dict(name="unet", features="64,128"), "features must be a non-empty list"),
    (dict(name="unet", features=[8, 0]), r"features\[1\] must be a positive integer"),
    (dict(name="unet", features=[8, 16.5]), r"features\[1\] must be a positive integer"),
    (dict(name="unet", in_channels=True), "in_channels must be a positive integer"),
    (dict(name="unet", out_channels=0), "out_channels must be a positive integer"),
    (dict(name="unet_ra", attention_ratio=0), "ratio must be > 0"),
])
def test_build_network_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    args = dict(in_channels=1, out_channels=1, features=TINY) | kwargs
    with pytest.raises(ConfigError, match=message):
        build_network(**args)


def test_build_network_accepts_yaml_style_values() -> None:
    model = build_network("unet_spconv", "1", 2.0, features=[8.0, "16"], alpha="0.5")
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)


def test_too_small_input_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="needs H, W >= 8"):
        tiny("unet").eval()(torch.randn(1, 1, 7, 32))


# --- every network ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, variant", VERSIONS, ids=VERSION_IDS)
def test_odd_input_gives_output_of_input_size(name: str, variant: str) -> None:
    model = tiny(name, in_channels=1, out_channels=2, variant=variant).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 97, 83)).shape == (1, 2, 97, 83)
        wide = tiny(name, in_channels=3, variant=variant).eval()
        assert wide(torch.randn(2, 3, 33, 40)).shape == (2, 2, 33, 40)


def generic_point(model: nn.Module) -> nn.Module:
    """`model` in float64 with random BatchNorm scales and shifts.

    At initialisation (BN bias 0) some gradients are zero for every input: BN -> ReLU is then
    positively homogeneous in the BN scale, and a bias-free conv -> train-mode BN after it is
    scale-invariant, so a one-channel BN's scale gets exactly zero gradient (float32 shows
    rounding noise of 1e-10 there, which made the old test pass or fail by chance). That zero
    belongs to the starting point, not to the wiring; at a generic point it is gone. Conv biases
    are made slightly positive for the same reason: a ReLU after a one-channel 1x1 conv of a
    non-negative map (the thesis MFE's narrow branches at width 8) is dead for every input when
    its random weight and bias are both negative.
    """
    g = torch.Generator().manual_seed(1)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                m.bias.copy_(0.05 + 0.1 * torch.rand(m.bias.shape, generator=g,
                                                     dtype=torch.float64))
    return model


def structural_zeros(model: nn.Module) -> set[str]:
    """Parameters whose gradient is zero at every point, and why.

    SPConv's redundant 1x1 conv keeps the bias of the official code (its parameter count is the
    study's), but feeds a BatchNorm straight away: in train mode BN subtracts the batch mean, so a
    per-channel constant added before it cancels exactly and its gradient is 0. The same holds
    for a transposed conv's bias where the decoder block starts with SPConv: the concatenation
    puts the up-sampled channels last, which is exactly SPConv's redundant part (alpha 0.5), so
    that bias too only reaches the 1x1 -> BN path (the test's input needs no zero-padding, which
    would make the constant uneven).
    """
    zeros = {f"{name}.conv1x1.bias" for name, m in model.named_modules() if isinstance(m, SPConv)}
    for i, (up, block) in enumerate(zip(model.ups, model.decoder)):
        first = block.block[0] if isinstance(block, DoubleConv) else None
        if isinstance(first, SPConv) and first.conv1x1.in_channels == up.out_channels:
            zeros.add(f"ups.{i}.bias")
    return zeros


def gradient_report(model: nn.Module, in_channels: int = 1) -> tuple[dict[str, float], float]:
    """Each parameter's gradient norm after a backward pass over several float64 inputs, and the
    median norm (the scale that "zero" is judged against)."""
    model = model.train()
    g = torch.Generator().manual_seed(2)
    loss = sum((model(torch.randn(2, in_channels, 32, 40, generator=g, dtype=torch.float64))
                * torch.randn(1, 2, 32, 40, generator=g, dtype=torch.float64)).sum()
               for _ in range(3))
    model.zero_grad()
    loss.backward()
    norms = {n: (float("nan") if p.grad is None else p.grad.norm().item())
             for n, p in model.named_parameters()}
    return norms, float(torch.tensor(list(norms.values())).nanmedian())


def disconnected(model: nn.Module) -> list[str]:
    """Parameters with no gradient, or one that is rounding-size against the median (1e-9 of it:
    float64 rounding is ~1e-16 relative, a real gradient at a generic point is many orders above),
    leaving out the structural zeros, which must really be zero."""
    norms, scale = gradient_report(model)
    zeros = structural_zeros(model)
    for name in zeros:
        assert norms[name] < 1e-9 * scale, f"{name} was expected to be a structural zero"
    return [n for n, v in norms.items()
            if n not in zeros and not (math.isfinite(v) and v > 1e-9 * scale)]


@pytest.mark.parametrize("name, variant", VERSIONS, ids=VERSION_IDS)
def test_gradients_reach_every_parameter(name: str, variant: str) -> None:
    assert disconnected(generic_point(tiny(name, variant=variant))) == []


def test_gradient_check_finds_a_disconnected_parameter() -> None:
    """The check above must fail when a parameter is really cut off from the output: an unused
    conv (no gradient at all), and a BatchNorm that runs but whose output is multiplied by zero
    (a gradient of exactly zero)."""
    model = generic_point(tiny("unet"))
    model.unused = nn.Conv2d(1, 1, 3).double()
    assert disconnected(model) == ["unused.weight", "unused.bias"]
    model.decoder[0].block[1] = Bypass(model.decoder[0].block[1])
    assert set(disconnected(model)) == {"unused.weight", "unused.bias",
                                        "decoder.0.block.1.inner.weight",
                                        "decoder.0.block.1.inner.bias"}


class Bypass(nn.Module):
    """Passes its input on and adds 0 x `inner`'s output: `inner` runs but gets zero gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * self.inner(x)


@pytest.mark.parametrize("name, variant", VERSIONS, ids=VERSION_IDS)
def test_eval_mode_uses_running_statistics_and_is_batch_independent(name: str,
                                                                    variant: str) -> None:
    """Train mode normalises with the batch's statistics (so a slice's output depends on its batch
    mates); eval mode uses the running statistics, so one slice alone gives what it gives inside a
    batch. Fails if BN stays in train mode or any layer (SPConv's pooling, attention) mixes the
    batch."""
    model = tiny(name, variant=variant).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 40, 36, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(x + 0.5)  # move the running statistics away from their initial values
        train_batch, train_alone = model(x)[:1], model(x[:1])
        model.eval()
        eval_batch, eval_alone = model(x)[:1], model(x[:1])
    assert not torch.allclose(train_batch, train_alone)  # batch statistics: depends on mates
    assert not torch.allclose(eval_batch, train_batch)   # running vs batch statistics
    torch.testing.assert_close(eval_alone, eval_batch)


def synthetic_batch(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy bright discs on a dark background: image (n,1,size,size), label (n,1,size,size)."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = []
    for _ in range(n):
        cy, cx = torch.randint(8, size - 8, (2,), generator=g)
        r = torch.randint(4, 8, (1,), generator=g)
        labels.append((((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2).float())
    label = torch.stack(labels)[:, None]
    return label + 0.3 * torch.randn(label.shape, generator=g), label


@pytest.mark.parametrize("name, variant", VERSIONS, ids=VERSION_IDS)
def test_network_learns_a_fixed_batch(name: str, variant: str) -> None:
    image, label = synthetic_batch()
    model = tiny(name, out_channels=1, variant=variant).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(sigmoid=True)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.5 * losses[0], losses


@pytest.mark.parametrize("name, variant", VERSIONS, ids=VERSION_IDS)
def test_works_inside_monai_inferers(name: str, variant: str) -> None:
    model = tiny(name, variant=variant).eval()
    sliding = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=2, overlap=0.25)
    slices = SliceInferer(roi_size=(32, 32), spatial_dim=0, sw_batch_size=2, overlap=0.25)
    with torch.no_grad():
        assert sliding(torch.randn(1, 1, 50, 45), model).shape == (1, 2, 50, 45)
        assert slices(torch.randn(1, 1, 3, 40, 36), model).shape == (1, 2, 3, 40, 36)


@pytest.mark.parametrize("name, variant", VERSIONS, ids=VERSION_IDS)
def test_builds_from_a_monai_bundle_config(name: str, variant: str) -> None:
    parser = ConfigParser({"network_def": {
        "_target_": "ctseg.networks.build_network", "name": name, "in_channels": 1,
        "out_channels": 2, "features": list(TINY), "variant": variant}})
    model = parser.get_parsed_content("network_def").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 24, 24)).shape == (1, 2, 24, 24)


@pytest.mark.parametrize("name, variant", VERSIONS, ids=VERSION_IDS)
def test_traces_scripts_and_exports(name: str, variant: str) -> None:
    """TorchScript (traced or scripted) runs without ctseg installed, e.g. as a bundle's model.ts;
    a trace keeps the size arithmetic, so it also runs on odd sizes it was not traced with."""
    model = tiny(name, variant=variant).eval()
    x, odd = torch.randn(1, 1, 48, 40), torch.randn(2, 1, 41, 37)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and jit deprecation warnings
        traced = torch.jit.trace(model, x)
        scripted = torch.jit.script(model)
        for inp in (x, odd):
            expected = model(inp)
            torch.testing.assert_close(traced(inp), expected)
            torch.testing.assert_close(scripted(inp), expected)
        exported = torch.export.export(model, (odd,))
        torch.testing.assert_close(exported.module()(odd), model(odd))
