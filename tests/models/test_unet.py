"""The U-Net solver with a ResNet-18 encoder and its local pretrained-weight loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from relaylearn.errors import ConfigError
from relaylearn.models.unet import ResNet18Encoder, UNetResNet18, load_resnet18_weights


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def torchvision_resnet18_state(in_channels: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's resnet18 names and shapes (fc included), random values."""
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in ResNet18Encoder(in_channels).state_dict().items()}
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_parameter_counts_match_the_hand_computed_figures():
    model = UNetResNet18()
    encoder = count(model.encoder)
    decoder = count(model) - encoder
    assert encoder == 11_176_512
    assert decoder == 4_696_323  # five Up stages (convs with bias) + 1×1 head


def test_encoder_names_are_torchvision_names():
    keys = list(ResNet18Encoder().state_dict())
    assert len(keys) == 120  # torchvision resnet18 has 122 entries, two of them fc.*
    for name in ("conv1.weight", "bn1.num_batches_tracked", "layer2.0.downsample.0.weight", "layer3.0.downsample.1.running_var", "layer4.1.bn2.bias"):
        assert name in keys
    assert not any(k.startswith("fc.") for k in keys)


@pytest.mark.parametrize(("in_channels", "height", "width", "bilinear"), [(3, 64, 64, False), (1, 32, 96, True)])
def test_forward_shapes_and_gradients(in_channels, height, width, bilinear):
    model = UNetResNet18(in_channels=in_channels, num_classes=4, bilinear=bilinear)
    x = torch.randn(2, in_channels, height, width)
    logits = model(x)
    assert logits.shape == (2, 4, height, width)
    logits.sum().backward()
    assert model.encoder.conv1.weight.grad is not None
    assert model.decoder[-1].conv[0].weight.grad.abs().sum() > 0


def test_skip_shapes_follow_the_layout():
    skips = ResNet18Encoder().eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(s.shape[1:]) for s in skips] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]


def test_bilinear_variant_has_no_transposed_convs():
    model = UNetResNet18(bilinear=True)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    assert count(model) - count(model.encoder) < 4_696_323


def test_size_not_divisible_by_32_is_a_clear_error():
    with pytest.raises(ConfigError, match="48x64 is not divisible by 32"):
        UNetResNet18()(torch.randn(1, 3, 48, 64))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_weights_load_into_the_encoder(tmp_path, suffix):
    state = torchvision_resnet18_state()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = UNetResNet18(pretrained_path=path)
    loaded = model.encoder.state_dict()
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name
    report = load_resnet18_weights(model.encoder, path)
    assert len(report.loaded) == 120
    assert set(report.skipped) == {"fc.weight", "fc.bias"}


def test_other_in_channels_keep_a_random_first_conv(tmp_path):
    state = torchvision_resnet18_state(in_channels=3)
    path = tmp_path / "resnet18.safetensors"
    save_file(state, str(path))
    model = UNetResNet18(in_channels=1)
    before = model.encoder.conv1.weight.clone()
    report = load_resnet18_weights(model.encoder, path)
    assert "conv1.weight" in report.skipped and "shape" in report.skipped["conv1.weight"]
    assert torch.equal(model.encoder.conv1.weight, before)
    assert torch.equal(model.encoder.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_missing_unreadable_or_foreign_files_raise_config_error(tmp_path):
    encoder = ResNet18Encoder()
    with pytest.raises(ConfigError, match="not found") as missing:
        load_resnet18_weights(encoder, tmp_path / "absent.safetensors")
    assert "absent.safetensors" in str(missing.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="cannot read") as unreadable:
        load_resnet18_weights(encoder, garbage)
    assert "garbage.safetensors" in str(unreadable.value)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2), "something.else": torch.zeros(3)}, str(foreign))
    with pytest.raises(ConfigError, match="no tensor") as nothing:
        load_resnet18_weights(encoder, foreign)
    assert "foreign.safetensors" in str(nothing.value)

    wrong_suffix = tmp_path / "weights.bin"
    wrong_suffix.write_bytes(b"")
    with pytest.raises(ConfigError, match=".safetensors or .pth"):
        load_resnet18_weights(encoder, wrong_suffix)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
def test_centre_tap_convolution_on_a_1x1_map_equals_the_full_convolution(stride, groups):
    """Values and gradients (input and every tap of the weight) equal nn.Conv2d's on a 1×1 map;
    on larger maps the module is nn.Conv2d."""
    from torch.nn import functional as F

    from relaylearn.models.unet import CentreTapConv2d

    torch.manual_seed(0)
    conv = CentreTapConv2d(6, 4, 3, stride, 1, bias=True, groups=groups).double()
    for size in (1, 3):
        x = torch.randn(4, 6, size, size, dtype=torch.double, requires_grad=True)
        out = conv(x)
        reference = F.conv2d(x, conv.weight, conv.bias, stride, 1, groups=groups)
        torch.testing.assert_close(out, reference)
        grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
        expected = torch.autograd.grad(reference.square().sum(), (x, conv.weight, conv.bias))
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want)
        if size == 1:
            outer = grads[1].clone()
            outer[:, :, 1, 1] = 0
            assert torch.count_nonzero(outer) == 0 and torch.count_nonzero(grads[1][:, :, 1, 1]) > 0


@pytest.mark.parametrize("kernel", [(2, 2), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 6, 5, 4), (1, 6, 2, 2)], ids=["columns (kh, kw, Cout)", "columns (Cout, kh, kw)"])
def test_patch_transposed_convolution_equals_the_transposed_convolution(kernel, bias, layout, shape):
    """Kernel = stride: values and gradients (input, weight, bias) equal F.conv_transpose2d's, the
    output in channels-last whatever the input's layout; with the product's columns in either
    order (N·H·W = 60 or 4 pixels against Cin = 6)."""
    from torch.nn import functional as F

    from relaylearn.models.unet import PatchConvTranspose2d

    torch.manual_seed(0)
    up = PatchConvTranspose2d(6, 4, kernel, stride=kernel, bias=bias).double()
    x = torch.randn(*shape, dtype=torch.double).contiguous(memory_format=layout).requires_grad_()
    out = up(x)
    reference = F.conv_transpose2d(x, up.weight, up.bias, stride=kernel)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference)
    params = (x, up.weight) + ((up.bias,) if bias else ())
    for got, want in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(reference.square().sum(), params)):
        torch.testing.assert_close(got, want)


def test_patch_transposed_convolution_in_bf16_and_where_patches_overlap(monkeypatch):
    """Under CPU bf16 autocast it stays within bf16 rounding of the fp32 result; with a kernel
    larger than the stride it is nn.ConvTranspose2d (no matrix product)."""
    from torch.nn import functional as F

    from relaylearn.models.unet import PatchConvTranspose2d

    torch.manual_seed(0)
    up = PatchConvTranspose2d(32, 16, 2, stride=2)
    x = torch.randn(4, 32, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = up(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), F.conv_transpose2d(x, up.weight, up.bias, stride=2), atol=0.05, rtol=0.02)

    products = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: (products.append(1), linear(*a, **k))[1])
    overlapping = PatchConvTranspose2d(32, 16, 4, stride=2)
    torch.testing.assert_close(overlapping(x), F.conv_transpose2d(x, overlapping.weight, overlapping.bias, stride=2))
    assert not products
    up(x)
    assert len(products) == 1


def test_the_encoder_runs_its_last_stage_on_the_centre_tap_at_32_px(monkeypatch):
    """At 32 px the last stage's three 1×1-map convolutions are products with the 512×512 centre
    tap (what makes them cheap), and no 3×3 kernel meets a 1×1 map."""
    from torch.nn import functional as F

    kernels, products = [], []
    conv2d, linear = F.conv2d, F.linear
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a, **k: (kernels.append((tuple(x.shape[-2:]), tuple(w.shape))), conv2d(x, w, *a, **k))[1])
    monkeypatch.setattr(F, "linear", lambda x, w, *a, **k: (products.append(tuple(w.shape)), linear(x, w, *a, **k))[1])
    UNetResNet18().encoder(torch.randn(2, 3, 32, 32))
    assert products.count((512, 512)) == 3
    assert not [w for size, w in kernels if size == (1, 1) and w[-2:] != (1, 1)]
