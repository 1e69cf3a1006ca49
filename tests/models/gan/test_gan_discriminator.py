"""Tests of relaylearn.models.gan.discriminator (tiny sizes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from relaylearn.models.gan import ProjectionDiscriminator

RES, C_DIM = 16, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(img_channels: int = 4, **kwargs) -> ProjectionDiscriminator:
    return ProjectionDiscriminator(img_channels, C_DIM, RES, channel_base=128, channel_max=16, mapping_layers=2, **kwargs)


def test_shapes_and_layout():
    d = tiny()
    assert [type(b).__name__ for b in d.blocks] == ["DiscriminatorBlock"] * 2  # 16 → 8 → 4
    assert d.blocks[0].from_rgb is not None and d.blocks[1].from_rgb is None
    assert d.cmap_dim == 16  # channels at 4×4
    logits = d(torch.randn(3, 4, RES, RES), F.one_hot(torch.tensor([0, 1, 4]), C_DIM).float())
    assert logits.shape == (3,) and logits.dtype == torch.float32


def test_projection_uses_the_class_vector():
    d = tiny()
    x = torch.randn(2, 4, RES, RES)
    a = d(x, F.one_hot(torch.tensor([0, 0]), C_DIM).float())
    b = d(x, F.one_hot(torch.tensor([3, 3]), C_DIM).float())
    assert not torch.allclose(a, b)
    two_hot = torch.zeros(2, C_DIM)
    two_hot[:, [0, 3]] = 1
    assert torch.isfinite(d(x, two_hot)).all()


def test_projection_formula():
    d = tiny()
    x, c = torch.randn(4, 4, RES, RES), torch.eye(C_DIM)[:4]
    features = x
    for block in d.blocks:
        features = block(features)
    ep = d.epilogue
    h = ep.out(ep.fc(ep.conv(ep.mbstd(features)).flatten(1)))
    expected = (h * d.mapping(None, c)).sum(1) / math.sqrt(d.cmap_dim)
    assert torch.allclose(d(x, c), expected, atol=1e-5)


def test_minibatch_group_fallback_for_odd_batches():
    d = tiny(img_channels=1)
    for n in (1, 3, 4, 6):
        assert d(torch.randn(n, 1, RES, RES), torch.eye(C_DIM)[[0] * n]).shape == (n,)


def test_unconditional_variant():
    d = ProjectionDiscriminator(1, 0, RES, channel_base=64, channel_max=8)
    assert d.mapping is None
    assert d(torch.randn(2, 1, RES, RES)).shape == (2,)


def test_every_parameter_gets_a_gradient():
    d = tiny()
    x, c = torch.randn(4, 4, RES, RES), torch.eye(C_DIM)[:4]
    (F.softplus(d(x, c)) + F.softplus(-d(x + 1, c))).mean().backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_bad_inputs_raise():
    d = tiny()
    with pytest.raises(ValueError, match="x must be"):
        d(torch.randn(2, 3, RES, RES), torch.eye(C_DIM)[:2])
    with pytest.raises(ValueError, match="c must be"):
        d(torch.randn(2, 4, RES, RES), torch.eye(C_DIM)[:3])


def test_autocast_bfloat16():
    d = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = d(torch.randn(2, 4, RES, RES), torch.eye(C_DIM)[:2])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("n", [8, 6])  # groups of 4, and the whole-chunk fallback
def test_chunks_give_the_logits_of_one_call_per_chunk(n):
    torch.manual_seed(0)
    d = ProjectionDiscriminator(3, 4, img_resolution=16, channel_base=128, channel_max=16, mapping_layers=1).double()
    x = torch.randn(2 * n, 3, 16, 16, dtype=torch.double)
    c = F.one_hot(torch.randint(0, 4, (2 * n,)), 4).double()
    separate = torch.cat([d(x[:n], c[:n]), d(x[n:], c[n:])])
    torch.testing.assert_close(d(x, c, chunks=2), separate)
    assert not torch.allclose(d(x, c), separate)  # one batch of 2n: the minibatch statistics mix the halves
    with pytest.raises(ValueError, match="equal chunks"):
        d(x[:-1], c[:-1], chunks=2)
