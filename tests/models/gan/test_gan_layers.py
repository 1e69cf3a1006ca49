"""Tests of relaylearn.models.gan.layers: resampling, equalised LR, modulated conv, mbstd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relaylearn.models.gan.layers import (
    EqualizedConv2d,
    EqualizedLinear,
    MinibatchStdDev,
    NoiseInput,
    bias_act,
    broadcast_for_add,
    conv2d_resample,
    depthwise_correlate,
    downsample2d,
    fir_filter2d,
    make_resample_kernel,
    modulated_conv2d,
    upsample2d,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_resample_kernel_is_normalised_and_separable():
    k = make_resample_kernel()
    assert k.shape == (4, 4)
    assert torch.isclose(k.sum(), torch.tensor(1.0))
    assert torch.allclose(k[0], torch.tensor([1, 3, 3, 1]) / 64)


def test_depthwise_correlate_equals_grouped_conv_to_second_order():
    """Same values and same first and second derivatives as autograd's grouped convolution
    (an asymmetric kernel, so a wrong flip in the adjoint would show)."""
    weight = torch.randn(3, 1, 4, 3, dtype=torch.float64)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    results = []
    for fn in (lambda t: depthwise_correlate(t, weight), lambda t: F.conv2d(t, weight, groups=3)):
        y = fn(x)
        (grad,) = torch.autograd.grad((y * probe).square().sum(), x, create_graph=True)
        (grad2,) = torch.autograd.grad(grad.sin().sum(), x)
        results.append((y.detach(), grad.detach(), grad2))
    for ours, reference in zip(*results):
        assert torch.allclose(ours, reference, atol=1e-10)
    assert torch.autograd.gradgradcheck(lambda t: depthwise_correlate(t, weight), (x,))


def test_depthwise_correlate_double_backward_is_one_convolution_per_order():
    """R1's and the path-length penalty's cost: autograd's double backward of a grouped
    convolution runs one convolution per group; ours runs a fixed few, whatever C is."""
    from torch.profiler import ProfilerActivity, profile

    channels = 64
    weight = make_resample_kernel()[None, None].expand(channels, 1, -1, -1)
    x = torch.randn(2, channels, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(depthwise_correlate(x, weight).square().sum(), x, create_graph=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        grad.square().sum().backward()
    convolutions = sum(e.count for e in prof.key_averages() if e.key in ("aten::convolution", "aten::convolution_backward"))
    assert 0 < convolutions <= 4


@pytest.mark.parametrize("padding", [(1, 2), (3, 0)])
def test_depthwise_correlate_with_padding_equals_padded_grouped_conv_to_second_order(padding):
    weight = torch.randn(3, 1, 4, 3, dtype=torch.float64)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for fn in (lambda t: depthwise_correlate(t, weight, padding), lambda t: F.conv2d(t, weight, padding=padding, groups=3)):
        y = fn(x)
        (grad,) = torch.autograd.grad(y.cos().sum(), x, create_graph=True)
        (grad2,) = torch.autograd.grad(grad.sin().sum(), x)
        results.append((y.detach(), grad.detach(), grad2))
    for ours, reference in zip(*results):
        assert ours.shape == reference.shape
        assert torch.allclose(ours, reference, atol=1e-10)


def test_fir_filter_pads_in_the_convolution_or_explicitly_with_the_same_result():
    k = make_resample_kernel()
    x = torch.randn(2, 3, 9, 9)
    for padding in [(1, 1, 1, 1), (2, 2, 0, 0), (2, 1, 2, 1), (4, 4, 4, 4)]:  # last two: explicit F.pad
        expected = F.conv2d(F.pad(x, padding), (k * 4)[None, None].expand(3, 1, -1, -1), groups=3)
        assert torch.allclose(fir_filter2d(x, k, padding, gain=4.0), expected, atol=1e-5)


def test_depthwise_correlate_rejects_padding_of_a_kernel_size_or_more():
    with pytest.raises(ValueError, match=r"padding must be in \[0, k\)"):
        depthwise_correlate(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), (3, 0))


def test_depthwise_correlate_rejects_a_trainable_or_misshaped_weight():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="constant"):
        depthwise_correlate(x, torch.randn(2, 1, 3, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"\[2, 1, kh, kw\]"):
        depthwise_correlate(x, torch.randn(3, 1, 3, 3))


def test_upsample_and_downsample_shapes_and_dc_gain():
    k = make_resample_kernel()
    const = torch.full((2, 3, 8, 8), 2.5)
    up = upsample2d(const, k)
    down = downsample2d(const, k)
    assert up.shape == (2, 3, 16, 16) and down.shape == (2, 3, 4, 4)
    # Away from the zero-padded border a constant stays constant.
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 2.5))
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 2.5))


def test_upsample_is_centred():
    # A linear ramp stays a (finer) linear ramp, with samples centred between the coarse ones.
    k = make_resample_kernel()
    ramp = torch.arange(8.0).reshape(1, 1, 1, 8).expand(1, 1, 8, 8)
    up = upsample2d(ramp.contiguous(), k)[0, 0, 4]
    expected = (torch.arange(16.0) - 0.5) / 2
    assert torch.allclose(up[2:-2], expected[2:-2], atol=1e-5)


def test_up_conv_equals_fir_upsample_then_conv_in_the_interior():
    k = make_resample_kernel()
    x, w = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 3, 3)
    fused = conv2d_resample(x, w, k, up=True)
    reference = F.conv2d(upsample2d(x, k), w, padding=1)
    assert fused.shape == reference.shape == (2, 5, 12, 12)
    assert torch.allclose(fused[..., 2:-2, 2:-2], reference[..., 2:-2, 2:-2], atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_down_conv_equals_conv_then_fir_downsample_in_the_interior(kernel_size):
    k = make_resample_kernel()
    x, w = torch.randn(2, 3, 12, 12), torch.randn(5, 3, kernel_size, kernel_size)
    fused = conv2d_resample(x, w, k, down=True)
    reference = downsample2d(F.conv2d(x, w, padding=kernel_size // 2), k)
    assert fused.shape == reference.shape == (2, 5, 6, 6)
    assert torch.allclose(fused[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize("up", [False, True])
def test_modulated_conv_equals_per_sample_weights(up):
    k = make_resample_kernel()
    x, w, styles = torch.randn(3, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(3, 4)
    out = modulated_conv2d(x, w, styles, demodulate=True, up=up, kernel=k)
    for n in range(3):
        w_n = w * styles[n].reshape(1, -1, 1, 1)
        w_n = w_n / (w_n.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        ref = conv2d_resample(x[n : n + 1], w_n, k, up=up)
        assert torch.allclose(out[n : n + 1], ref, atol=1e-5)


def test_demodulation_gives_unit_output_variance():
    x = torch.randn(4, 64, 16, 16)
    out = modulated_conv2d(x, torch.randn(32, 64, 3, 3), torch.randn(4, 64) * 3, demodulate=True)
    assert 0.8 < out.std().item() < 1.2


def test_equalized_linear_runtime_scaling_and_lr_multiplier():
    layer = EqualizedLinear(400, 300, bias_init=1.0, lr_multiplier=0.01)
    assert 80 < layer.weight.std().item() < 120  # stored N(0,1)/lr_mult
    y = layer(torch.randn(256, 400))
    assert 0.85 < (y - 1).std().item() < 1.15  # unit-variance in, unit-variance out, bias 1
    assert torch.allclose(y.mean(), torch.tensor(1.0), atol=0.1)


@pytest.mark.parametrize("bias", [True, False])
def test_equalized_linear_equals_scaled_weights_and_bias_on_any_leading_shape(bias):
    """The gains applied inside addmm give what scaled parameters would, with their gradients."""
    layer = EqualizedLinear(6, 5, bias=bias, bias_init=0.3, lr_multiplier=0.01, activation="lrelu").double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    y = layer(x)
    b = None if layer.bias is None else layer.bias * layer.bias_gain
    reference = bias_act(F.linear(x, layer.weight * layer.weight_gain, b), None, "lrelu")
    assert y.shape == (2, 3, 5) and torch.allclose(y, reference, atol=1e-12)
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    expected = torch.autograd.grad(reference.square().sum(), list(layer.parameters()))
    for ours, theirs in zip(grads, expected):
        assert torch.allclose(ours, theirs, atol=1e-10)


def test_equalized_conv_lrelu_gain_and_clamp():
    conv = EqualizedConv2d(64, 64, 3, activation="lrelu", conv_clamp=0.5)
    y = conv(torch.randn(2, 64, 8, 8))
    assert y.abs().max().item() <= 0.5 + 1e-6
    y2 = conv(torch.randn(2, 64, 8, 8), gain=2.0)
    assert y2.abs().max().item() <= 1.0 + 1e-6  # the clamp scales with the gain


def test_bias_act_clamp_matches_torch_clamp_to_second_order():
    """Values, gradients and second derivatives (what R1 and path-length penalties use) equal
    ``x.clamp`` off the clamp's two boundary values."""
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, dtype=torch.double) * 2).requires_grad_()
    bias = torch.randn(3, dtype=torch.double, requires_grad=True)

    def reference(x, bias):
        y = F.leaky_relu(x + bias.reshape(1, -1, 1, 1), 0.2) * math.sqrt(2.0) * 1.5
        return y.clamp(-1.5 * 1.5, 1.5 * 1.5)

    got, want = bias_act(x, bias, "lrelu", gain=1.5, clamp=1.5), reference(x, bias)
    torch.testing.assert_close(got, want)
    assert (want.abs() == 2.25).sum() > 10  # the clamp is active on part of the input
    g_got = torch.autograd.grad(got.tanh().sum(), (x, bias), create_graph=True)
    g_want = torch.autograd.grad(want.tanh().sum(), (x, bias), create_graph=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    h_got = torch.autograd.grad(sum(g.square().sum() for g in g_got), (x, bias))
    h_want = torch.autograd.grad(sum(g.square().sum() for g in g_want), (x, bias))
    for a, b in zip(h_got, h_want):
        torch.testing.assert_close(a, b)


def test_bias_act_lrelu_gain():
    x = torch.tensor([[-1.0, 2.0]])
    y = bias_act(x, torch.tensor([0.0, 1.0]), "lrelu")
    assert torch.allclose(y, torch.tensor([[-0.2, 3.0]]) * math.sqrt(2))
    with pytest.raises(ValueError):
        bias_act(x, None, "tanh")


@pytest.mark.parametrize("operand", ["bias", "noise"])
def test_broadcast_for_add_expands_16_bit_channels_last_operands_with_the_same_sums_and_gradients(operand):
    """A bias [1,C,1,1] or noise map [N,1,H,W] added to a bf16 channels-last [N,16,H,W] comes
    expanded in that layout; sums, gradients and second derivatives equal the broadcast add's
    bit for bit."""
    x0 = torch.randn(4, 16, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y0 = torch.randn(1, 16, 1, 1) if operand == "bias" else torch.randn(4, 1, 6, 6)
    y0 = y0.to(torch.bfloat16)
    expanded = broadcast_for_add(y0, x0)
    assert expanded.shape == x0.shape and expanded.is_contiguous(memory_format=torch.channels_last)

    def results(expand: bool):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        out = x + (broadcast_for_add(y, x) if expand else y)
        grads = torch.autograd.grad(out.float().square().sum(), (x, y), create_graph=True)
        second = torch.autograd.grad(sum(g.float().square().sum() for g in grads), (x, y))
        return out, *grads, *second

    for got, want in zip(results(True), results(False)):
        assert torch.equal(got, want)


def test_broadcast_for_add_leaves_other_operands_alone():
    """fp32, contiguous layout, whole vectors of channels (32) or an operand of the full shape:
    the operand itself, broadcast by the add."""
    cl = torch.channels_last
    bias = torch.randn(1, 16, 1, 1)
    for x, y in [
        (torch.randn(2, 16, 4, 4).contiguous(memory_format=cl), bias),
        (torch.randn(2, 16, 4, 4).to(torch.bfloat16), bias.to(torch.bfloat16)),
        (torch.randn(2, 32, 4, 4).to(torch.bfloat16).contiguous(memory_format=cl), torch.randn(1, 32, 1, 1).to(torch.bfloat16)),
        (torch.randn(2, 16, 4, 4).to(torch.bfloat16).contiguous(memory_format=cl), torch.randn(2, 16, 4, 4).to(torch.bfloat16)),
    ]:
        assert broadcast_for_add(y, x) is y


def test_noise_input_modes():
    noise = NoiseInput(4)
    x = torch.zeros(2, 3, 4, 4)
    assert torch.equal(noise(x, "random"), x)  # strength starts at 0
    with torch.no_grad():
        noise.strength.fill_(1.0)
    assert torch.equal(noise(x, "const")[0, 0], noise.const_noise)
    assert torch.equal(noise(x, "none"), x)
    r = noise(x, "random")
    assert torch.equal(r[:, 0], r[:, 1])  # one noise map shared by all channels
    with pytest.raises(ValueError):
        noise(x, "fixed")


def test_minibatch_stddev_groups():
    mbstd = MinibatchStdDev(group_size=2, num_channels=1)
    x = torch.randn(4, 3, 2, 2)
    out = mbstd(x)
    assert out.shape == (4, 4, 2, 2)
    assert torch.equal(out[:, :3], x)
    # Groups are {0, 2} and {1, 3} (sample n in group n mod N/G).
    for members in ([0, 2], [1, 3]):
        expected = (x[members].var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(out[members, 3], expected.expand(2, 2, 2))


def test_minibatch_stddev_indivisible_batch_is_one_group():
    out = MinibatchStdDev(group_size=4)(torch.randn(3, 2, 2, 2))
    x = out[:, :2]
    expected = (x.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
    assert torch.allclose(out[:, 2], expected.expand(3, 2, 2))
