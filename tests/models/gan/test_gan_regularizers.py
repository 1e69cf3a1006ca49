"""Tests of relaylearn.models.gan.regularizers (R1 and path length)."""

from __future__ import annotations

import pytest
import torch

from relaylearn.models.gan import (
    AdaptiveAugment,
    ImageGenerator,
    ProjectionDiscriminator,
    path_length_penalty,
    r1_penalty,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_r1_of_a_linear_critic_is_the_squared_weight_norm():
    a = torch.randn(2, 3, 3)
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    logits = (x * a).sum(dim=[1, 2, 3])
    penalty = r1_penalty(logits, x)
    assert penalty.shape == (4,)
    assert torch.allclose(penalty, a.square().sum().expand(4))


def test_r1_through_augmentation_reaches_discriminator_parameters():
    d = ProjectionDiscriminator(4, 3, 16, channel_base=64, channel_max=8, mapping_layers=1)
    pipe = AdaptiveAugment("bgcfn", 4, p=0.7)
    image = torch.randn(4, 3, 16, 16, requires_grad=True)
    seg = torch.randn(4, 1, 16, 16)
    logits = d(pipe(torch.cat([image, seg], dim=1)), torch.eye(3)[[0, 1, 2, 1]])
    penalty = r1_penalty(logits, image)  # w.r.t. the image only, not the label channel
    assert penalty.shape == (4,) and (penalty > 0).all()
    (penalty.mean() * 0.4).backward()
    assert d.blocks[0].from_rgb.weight.grad.abs().sum() > 0
    assert d.mapping.layers[0].weight.grad.abs().sum() > 0


def test_r1_needs_grad_on_inputs():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(x.sum(dim=[1, 2, 3]), x)


def test_path_length_value_and_pl_mean_update():
    matrix = torch.randn(3, 2 * 4 * 4)

    def synthesize(ws):  # linear "generator": ws [N, 3, 2] → images [N, 2, 4, 4]
        return (ws.sum(dim=1) @ matrix[:2]).reshape(-1, 2, 4, 4) + ws[:, 2:, :1].reshape(-1, 1, 1, 1)

    ws = torch.randn(5, 3, 2, requires_grad=True)
    pl_mean = torch.tensor(1.5)
    torch.manual_seed(11)
    penalty, new_mean = path_length_penalty(synthesize, ws, None, pl_mean, decay=0.1)
    # Recompute by hand with the same noise.
    torch.manual_seed(11)
    out = synthesize(ws)
    noise = torch.randn_like(out) / 4.0
    (grad,) = torch.autograd.grad((out * noise).sum(), ws)
    lengths = grad.square().sum(2).mean(1).sqrt()
    expected_mean = 1.5 + 0.1 * (lengths.mean() - 1.5)
    assert torch.allclose(new_mean, expected_mean)
    assert torch.allclose(penalty, (lengths - expected_mean).square().mean())
    assert not new_mean.requires_grad and pl_mean.item() == 1.5  # caller stores it (after all-reduce)


def test_path_length_through_the_image_generator_is_twice_differentiable():
    g = ImageGenerator(8, 3, 12, 16, channel_base=128, channel_max=16, mapping_layers=2, spade_hidden=4)
    seg = torch.randn(4, 1, 16, 16)
    ws = g.mapping(torch.randn(4, 2, 8), torch.eye(3)[[0, 1, 2, 0]][:, None].expand(-1, 2, -1))
    images = g.synthesize(ws, seg)
    penalty, new_mean = path_length_penalty(lambda w: g.synthesize(w, seg), ws, images, torch.zeros([]))
    assert penalty.ndim == 0 and penalty > 0 and new_mean > 0
    (penalty * 2 * 4).backward()
    assert g.synthesis.blocks[1].conv0.weight.grad.abs().sum() > 0
    assert g.mapping.layers[0].weight.grad.abs().sum() > 0  # ws kept their graph to the mapping


def test_path_length_needs_grad_on_ws():
    with pytest.raises(ValueError, match="require grad"):
        path_length_penalty(lambda w: w, torch.randn(2, 3, 4), None, torch.zeros([]))
