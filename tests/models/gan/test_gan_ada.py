"""Tests of relaylearn.models.gan.ada: the augmentation pipe and the p controller."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from relaylearn.errors import ConfigError
from relaylearn.models.gan import AdaController, AdaptiveAugment, ProjectionDiscriminator
from relaylearn.models.gan.ada import bilinear_sample, make_filter_bank


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("spec,channels", [("bgcfn", 4), ("bgcfn", 3), ("bg", 1), ("cfn", 2)])
def test_p_zero_is_identity(spec, channels):
    x = torch.randn(5, channels, 16, 16)
    out = AdaptiveAugment(spec, channels, p=0.0)(x)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-6)


@pytest.mark.parametrize("spec", ["b", "g", "c", "f", "n"])
def test_p_one_changes_the_input(spec):
    x = torch.randn(8, 4, 16, 16)
    out = AdaptiveAugment(spec, 4, p=1.0)(x)
    changed = (out - x).flatten(1).abs().amax(dim=1) > 1e-3
    assert changed.float().mean() >= 0.5  # most samples altered (a flip or a 0 shift can be a no-op)


def test_unknown_spec_letter_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown letter 'x'"):
        AdaptiveAugment("bgx", 3)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match=r"\[N, 4, H, W\]"):
        AdaptiveAugment("bg", 4)(torch.randn(2, 3, 8, 8))


def test_geometry_keeps_a_constant_image_constant():
    x = torch.full((6, 4, 16, 16), 0.7)
    out = AdaptiveAugment("bg", 4, p=1.0)(x)
    assert torch.allclose(out, x, atol=1e-5)  # reflection: no border artefacts either


def test_integer_geometry_only_moves_pixels():
    # Flips, quarter turns and integer translations resample exactly: every output value is an input value.
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    pipe = AdaptiveAugment("b", 1, p=1.0)
    for _ in range(5):
        out = pipe(x)
        for n in range(2):
            values = out[n].flatten()
            assert torch.allclose(values, values.round(), atol=1e-3)
            assert set(values.round().long().tolist()) <= set(x[n].flatten().long().tolist())


def test_bilinear_sampler_matches_grid_sample_with_reflection():
    x = torch.randn(2, 3, 7, 9)
    u = torch.rand(2, 50) * 30 - 10  # well outside the image too
    v = torch.rand(2, 50) * 24 - 8
    ours = bilinear_sample(x, u, v)
    grid = torch.stack([u / 8 * 2 - 1, v / 6 * 2 - 1], dim=-1)[:, None]  # align_corners=True normalisation
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)[:, :, 0]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_color_on_four_channels_treats_the_label_like_grey():
    # For a grey RGB image equal to the label channel, the label channel must receive the
    # row-average scalar transform, i.e. end up equal to the mean of the transformed RGB.
    grey = torch.randn(8, 1, 8, 8)
    x = grey.expand(-1, 4, -1, -1).contiguous()
    out = AdaptiveAugment("c", 4, p=1.0)(x)
    assert torch.allclose(out[:, 3], out[:, :3].mean(dim=1), atol=1e-5)
    assert not torch.allclose(out[:, 3], x[:, 3])


def test_label_channel_is_not_affected_by_hue_and_saturation_but_rgb_is():
    x = torch.randn(16, 4, 8, 8)
    faithful = AdaptiveAugment("c", 4, p=1.0, faithful_hue_saturation=True)
    full = AdaptiveAugment("c", 4, p=1.0)
    torch.manual_seed(5)
    a = faithful(x)
    torch.manual_seed(5)
    b = full(x)
    assert torch.allclose(a[:, 3], b[:, 3], atol=1e-5)  # same brightness/contrast/flip draws
    assert not torch.allclose(a[:, :3], b[:, :3], atol=1e-3)


def test_filter_bank_sums_to_identity_and_separates_bands():
    bank = make_filter_bank()
    delta = torch.zeros(bank.shape[1])
    delta[bank.shape[1] // 2] = 1
    assert torch.allclose(bank.sum(0), delta, atol=1e-6)
    response = torch.fft.rfft(bank.double(), n=256).abs()  # [4, 129], bin k = k/256 cycles/px
    assert response[0, 0] > 0.99 and response[3, 0] < 1e-6  # DC in the lowest band only
    assert response[3, 128] > 0.99  # Nyquist in the highest band


def test_noise_only_adds_zero_mean_noise():
    x = torch.zeros(64, 1, 16, 16)
    out = AdaptiveAugment("n", 1, p=1.0)(x)
    assert abs(out.mean().item()) < 0.01 and 0.02 < out.std().item() < 0.3


def test_double_backward_through_the_pipe():
    """R1 through D∘ADA: grad with create_graph, then backward again into D's parameters."""
    d = ProjectionDiscriminator(4, 3, 16, channel_base=64, channel_max=8, mapping_layers=1)
    pipe = AdaptiveAugment("bgcfn", 4, p=1.0)
    x = torch.randn(4, 4, 16, 16, requires_grad=True)
    logits = d(pipe(x), torch.eye(3)[[0, 1, 2, 0]])
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    grad.square().sum().backward()
    # After the minibatch-stddev (the last smooth non-linearity) D is piecewise linear in x, so
    # ∂logits/∂x does not depend on the biases there: no R1 gradient for those.
    piecewise_linear_biases = {"epilogue.conv.bias", "epilogue.fc.bias", "epilogue.out.bias"}
    for name, p in d.named_parameters():
        if name in piecewise_linear_biases:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradgradcheck_of_the_pipe():
    pipe = AdaptiveAugment("bgcfn", 4, p=1.0)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)

    def augment_squared(inp):
        torch.manual_seed(7)  # the same random transform on every call
        return pipe(inp).square()

    assert torch.autograd.gradcheck(augment_squared, (x,), atol=1e-5)
    assert torch.autograd.gradgradcheck(augment_squared, (x,), atol=1e-5, fast_mode=True)


def test_autocast_and_dtype():
    pipe = AdaptiveAugment("bgcfn", 4, p=0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pipe(torch.randn(2, 4, 16, 16).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_seeded_augmentation_is_deterministic():
    pipe = AdaptiveAugment("bgcfn", 4, p=0.6)
    x = torch.randn(4, 4, 16, 16)
    torch.manual_seed(3)
    a = pipe(x)
    torch.manual_seed(3)
    assert torch.equal(a, pipe(x))


def test_p_is_a_saved_buffer():
    pipe = AdaptiveAugment("bg", 1, p=0.25)
    assert set(pipe.state_dict()) == {"p"}
    assert pipe.state_dict()["p"].item() == 0.25


# ----------------------------------------------------------------------------------------------
# Controller


def test_controller_step_size_and_direction():
    ctrl = AdaController(target=0.6, interval=4, kimg=500, batch_size=128)
    assert ctrl.step_size == pytest.approx(128 * 4 / 500_000)  # 0.001024
    pipe = AdaptiveAugment("bg", 1, p=0.5)
    for logits in ([1.0, 1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]):  # signs mean (1 + 1 + 0 + 0)/4 = 0.5
        ctrl.accumulate(torch.tensor(logits))
    assert ctrl.num_steps.item() == 4 and ctrl.sign_sum.item() == 2
    ctrl.update(pipe)
    assert pipe.p.item() == pytest.approx(0.5 - 0.001024)
    assert ctrl.num_steps.item() == 0 and ctrl.sign_sum.item() == 0  # reset
    for _ in range(3):
        ctrl.accumulate(torch.tensor([2.0, 3.0, -1.0]))  # mean sign 1/3 ... then 1
    ctrl.accumulate(torch.tensor([5.0, 5.0, 5.0]))
    ctrl.update(pipe)  # mean (1/3·3 + 1)/4 = 0.5 < 0.6 → down again
    assert pipe.p.item() == pytest.approx(0.5 - 2 * 0.001024)
    for _ in range(4):
        ctrl.accumulate(torch.ones(3))
    ctrl.update(pipe)  # mean 1 > 0.6 → up
    assert pipe.p.item() == pytest.approx(0.5 - 0.001024)


def test_controller_clipping_world_size_and_empty_update():
    ctrl = AdaController(target=0.6, interval=4, kimg=1, batch_size=100, world_size=2)
    assert ctrl.step_size == pytest.approx(0.8)
    pipe = AdaptiveAugment("bg", 1, p=0.5)
    ctrl.accumulate(torch.ones(4))
    ctrl.update(pipe)
    assert pipe.p.item() == 1.0  # 0.5 + 0.8 clipped
    ctrl.accumulate(-torch.ones(4))
    ctrl.update(pipe)
    ctrl.accumulate(-torch.ones(4))
    ctrl.update(pipe)
    assert pipe.p.item() == 0.0  # 1 − 0.8 − 0.8 clipped
    ctrl.update(pipe)  # nothing accumulated: unchanged
    assert pipe.p.item() == 0.0


def test_controller_all_reduce_hook_sees_sum_and_count():
    ctrl = AdaController(target=0.6, interval=4, kimg=500, batch_size=128)
    pipe = AdaptiveAugment("bg", 1, p=0.5)
    seen = []

    def fake_all_reduce(t):  # another rank saw four steps of all-negative logits
        seen.append(t.clone())
        return (t + torch.tensor([-4.0, 4.0])) / 2

    for _ in range(4):
        ctrl.accumulate(torch.ones(2))
    ctrl.update(pipe, all_reduce_mean=fake_all_reduce)
    assert torch.equal(seen[0], torch.tensor([4.0, 4.0]))
    assert pipe.p.item() == pytest.approx(0.5 - 0.001024)  # global mean 0 < 0.6


def test_controller_update_cadence_and_state():
    ctrl = AdaController(interval=4)
    assert [ctrl.is_update_batch(i) for i in range(8)] == [False, False, False, True] * 2
    assert set(ctrl.state_dict()) == {"sign_sum", "num_steps"}
