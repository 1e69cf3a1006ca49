"""Tests of relaylearn.models.gan.generator (tiny sizes: 16 px, a few channels)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from relaylearn.models.gan import (
    AdaptiveAugment,
    ImageGenerator,
    LabelGenerator,
    MappingNetwork,
    ProjectionDiscriminator,
)

RES, C_DIM = 16, 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def onehot(ids, styles: int | None = None) -> torch.Tensor:
    c = F.one_hot(torch.as_tensor(ids), C_DIM).float()
    return c if styles is None else c[:, None].expand(-1, styles, -1)


def tiny_image_generator(**kwargs) -> ImageGenerator:
    return ImageGenerator(z_dim=8, c_dim=C_DIM, w_dim=12, img_resolution=RES, channel_base=128, channel_max=16, mapping_layers=2, spade_hidden=4, **kwargs)


def tiny_label_generator() -> LabelGenerator:
    return LabelGenerator(z_dim=6, c_dim=C_DIM, w_dim=10, img_resolution=RES, channel_base=64, channel_max=8)


def test_output_shapes_and_num_ws():
    g_img, g_lab = tiny_image_generator(), tiny_label_generator()
    assert g_img.num_ws == g_lab.num_ws == 6  # 1 + 2·2 convs + 1 toRGB at 16 px
    label = g_lab(torch.randn(3, 6), onehot([0, 1, 2]))
    image = g_img(torch.randn(3, 8), onehot([0, 1, 2]), label)
    assert label.shape == (3, 1, RES, RES) and image.shape == (3, 3, RES, RES)
    assert label.dtype == image.dtype == torch.float32
    ws = g_img.mapping(torch.randn(3, 2, 8), onehot([0, 1, 2], 2))
    assert ws.shape == (3, 6, 12)
    assert g_img.synthesize(ws, label).shape == (3, 3, RES, RES)
    assert g_lab.synthesize(g_lab.mapping(torch.randn(3, 6), onehot([0, 0, 0]))).shape == (3, 1, RES, RES)


def test_configured_w_dim_is_used():
    g = tiny_label_generator()
    assert g.mapping.w_dim == 10
    assert g.synthesis.blocks[0].conv1.affine.in_features == 10


def test_bad_shapes_raise():
    g = tiny_image_generator()
    with pytest.raises(ValueError, match="seg"):
        g(torch.randn(2, 8), onehot([0, 1]), None)
    with pytest.raises(ValueError, match="c must be"):
        g(torch.randn(2, 8), torch.zeros(2, 3), torch.zeros(2, 1, RES, RES))
    with pytest.raises(ValueError, match="ws must be"):
        g.synthesize(torch.randn(2, 5, 12), torch.zeros(2, 1, RES, RES))
    with pytest.raises(ValueError, match="power of two"):
        LabelGenerator(4, 2, 4, img_resolution=48)


def test_style_mixing_split_per_call():
    mapping = MappingNetwork(z_dim=4, c_dim=C_DIM, w_dim=3, num_ws=10, num_layers=1)
    z, c = torch.randn(5, 2, 4), onehot([[0, 1]] * 5)
    w_first = mapping(z[:, 0], c[:, 0], update_w_avg=False)[:, 0]
    w_second = mapping(z[:, 1], c[:, 1], update_w_avg=False)[:, 0]
    cutoffs = []
    for _ in range(300):
        ws = mapping(z, c, update_w_avg=False)
        is_first = torch.isclose(ws, w_first[:, None]).all(dim=2)  # [N, num_ws]
        is_second = torch.isclose(ws, w_second[:, None]).all(dim=2)
        assert (is_first ^ is_second).all()
        cutoff = int(is_first[0].sum())
        assert is_first[:, :cutoff].all() and is_second[:, cutoff:].all()  # same split for every sample
        assert 1 <= cutoff <= 9
        cutoffs.append(cutoff)
    # cutoff = 1 + Binomial(8, 1/2): mean 5, variance 2.
    mean = sum(cutoffs) / len(cutoffs)
    assert abs(mean - 5) < 0.4
    assert 1.2 < torch.tensor(cutoffs, dtype=torch.float).var().item() < 3.0


def test_single_style_broadcasts_and_rejects_three_styles():
    mapping = MappingNetwork(z_dim=4, c_dim=C_DIM, w_dim=3, num_ws=6, num_layers=1)
    ws = mapping(torch.randn(2, 1, 4), onehot([[1], [2]]))
    assert torch.equal(ws, ws[:, :1].expand_as(ws))
    with pytest.raises(ValueError, match="2 styles"):
        mapping(torch.randn(2, 3, 4), onehot([[1, 2, 3]] * 2))


def test_w_avg_update_flag():
    g = tiny_label_generator()
    z, c = torch.randn(4, 6), onehot([0, 1, 2, 3])
    g.train()
    g(z, c, update_w_avg=False)
    assert torch.count_nonzero(g.mapping.w_avg) == 0
    g.eval()
    g(z, c)  # default follows the training flag
    assert torch.count_nonzero(g.mapping.w_avg) == 0
    g.train()
    g(z, c)
    first = g.mapping.w_avg.clone()
    assert torch.count_nonzero(first) > 0
    w = g.mapping(z, c, update_w_avg=False)[:, 0]
    assert torch.allclose(first, w.mean(0) * (1 - 0.995), atol=1e-6)


def test_truncation_pulls_to_w_avg():
    g = tiny_label_generator()
    with torch.no_grad():
        g.mapping.w_avg.normal_()
    ws = g.mapping(torch.randn(3, 6), onehot([0, 1, 2]), truncation_psi=0.0, update_w_avg=False)
    assert torch.allclose(ws, g.mapping.w_avg.expand_as(ws))


def test_spade_conditions_on_the_label_map():
    g = tiny_image_generator().eval()
    z, c = torch.randn(2, 8), onehot([0, 0])
    seg_a = torch.zeros(2, 1, RES, RES)
    seg_b = torch.ones(2, 1, RES, RES)
    out_a = g(z, c, seg_a, noise_mode="const")
    assert torch.equal(out_a, g(z, c, seg_a, noise_mode="const"))
    assert not torch.allclose(out_a, g(z, c, seg_b, noise_mode="const"))


def test_spade_batchnorm_uses_running_stats_in_eval():
    g = tiny_image_generator()
    z, c, seg = torch.randn(4, 8), onehot([0, 1, 2, 3]), torch.randn(4, 1, RES, RES).sign()
    bn = g.synthesis.blocks[1].spade.norm
    g.train()
    before = bn.running_mean.clone()
    g(z, c, seg, noise_mode="const")
    assert not torch.equal(before, bn.running_mean)  # training updates the running statistics
    # Training mode: batch statistics, so a sample's output depends on its batch mates.
    alone = g(z[:1], c[:1], seg[:1], noise_mode="const")
    assert not torch.allclose(alone, g(z, c, seg, noise_mode="const")[:1], atol=1e-4)
    g.eval()
    stats = bn.running_mean.clone()
    alone = g(z[:1], c[:1], seg[:1], noise_mode="const")
    assert torch.allclose(alone, g(z, c, seg, noise_mode="const")[:1], atol=1e-5)
    assert torch.equal(stats, bn.running_mean)  # eval leaves them alone


def test_gradients_reach_every_generator_and_discriminator_parameter():
    g_img = tiny_image_generator().train()
    d_img = ProjectionDiscriminator(4, C_DIM, RES, channel_base=128, channel_max=16, mapping_layers=2)
    pipe = AdaptiveAugment("bgcfn", 4, p=0.5)
    seg = torch.randn(4, 1, RES, RES)
    c = onehot([0, 1, 2, 3])
    fake = g_img(torch.randn(4, 2, 8), c[:, None].expand(-1, 2, -1), seg)
    logits = d_img(pipe(torch.cat([fake, seg], dim=1)), c)
    F.softplus(-logits).mean().backward()
    for name, p in list(g_img.named_parameters()) + list(d_img.named_parameters()):
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name


def test_label_generator_gradients():
    g = tiny_label_generator()
    g(torch.randn(3, 6), onehot([0, 1, 2])).square().mean().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_autocast_bfloat16_runs():
    g_img, g_lab = tiny_image_generator(), tiny_label_generator()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        label = g_lab(torch.randn(2, 2, 6), onehot([0, 1], 2))
        image = g_img(torch.randn(2, 8), onehot([0, 1]), label)
    assert torch.isfinite(image).all() and image.shape == (2, 3, RES, RES)
    image.float().mean().backward()


def test_seeded_generation_is_deterministic():
    g = tiny_image_generator()
    seg = torch.randn(2, 1, RES, RES)
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        outputs.append(g(torch.randn(2, 2, 8), onehot([1, 3], 2), seg, update_w_avg=False))
    assert torch.equal(outputs[0], outputs[1])


def test_per_sample_c_is_shared_by_both_styles():
    mapping = MappingNetwork(z_dim=4, c_dim=C_DIM, w_dim=3, num_ws=6, num_layers=1)
    z = torch.randn(2, 2, 4)
    torch.manual_seed(1)
    shared = mapping(z, onehot([1, 2]), update_w_avg=False)
    torch.manual_seed(1)
    explicit = mapping(z, onehot([1, 2], 2), update_w_avg=False)
    assert torch.equal(shared, explicit)


def test_modules_survive_to_deepcopy_and_state_dict_round_trip():
    g = tiny_image_generator().to("cpu").eval()
    pipe = AdaptiveAugment("bgcfn", 4, p=0.3).to("cpu")
    twin = copy.deepcopy(g)
    fresh = tiny_image_generator().eval()
    fresh.load_state_dict(g.state_dict(), strict=True)
    z, c, seg = torch.randn(2, 8), onehot([0, 1]), torch.randn(2, 1, RES, RES)
    reference = g(z, c, seg, noise_mode="const")
    assert torch.equal(twin(z, c, seg, noise_mode="const"), reference)
    assert torch.equal(fresh(z, c, seg, noise_mode="const"), reference)
    pipe.double()  # buffers in another dtype must not break an fp32 forward
    assert pipe(torch.randn(2, 4, RES, RES)).dtype == torch.float32


def test_spade_uses_plain_convolutions_with_default_init_unless_equalized_lr_is_asked():
    from torch import nn

    from relaylearn.models.gan.generator import SPADE
    from relaylearn.models.gan.layers import EqualizedConv2d

    plain = SPADE(64, label_channels=1, hidden=32)
    for conv in (plain.shared, plain.gamma, plain.beta):
        assert type(conv) is nn.Conv2d and conv.padding == (1, 1)
    # PyTorch's default init: |w| <= 1/sqrt(fan_in), so the weights themselves are small and Adam's
    # fixed-size steps move them by a large fraction (the equalised weights are N(0, 1))
    bound = 1 / (32 * 9) ** 0.5
    assert plain.gamma.weight.abs().max() <= bound + 1e-6
    equalized = SPADE(64, label_channels=1, hidden=32, equalized_lr=True)
    assert all(isinstance(c, EqualizedConv2d) for c in (equalized.shared, equalized.gamma, equalized.beta))
    assert equalized.gamma.weight.std() > 0.5
    assert set(plain.state_dict()) == set(equalized.state_dict())  # same tensor names either way
    x, seg = torch.randn(2, 64, 8, 8), torch.randn(2, 1, 16, 16)
    assert plain(x, seg).shape == x.shape == equalized(x, seg).shape
    g = tiny_image_generator()
    assert type(g.synthesis.blocks[0].spade.gamma) is nn.Conv2d
    assert isinstance(tiny_image_generator(spade_equalized_lr=True).synthesis.blocks[0].spade.gamma, EqualizedConv2d)
