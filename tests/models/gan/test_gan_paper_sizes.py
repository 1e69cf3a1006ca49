"""The four replay-GAN networks built at the paper's sizes (docs/method.md#networks).

The layout follows the original exactly, so the parameter counts must equal the hand-computed
ones of §2.14 (G_label with the configured w_dim 128; the original's bug used 64).
"""

from __future__ import annotations

import pytest
import torch

from relaylearn.models.gan import ImageGenerator, LabelGenerator, ProjectionDiscriminator


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {
        "G_img": ImageGenerator(z_dim=128, c_dim=32, w_dim=256, img_resolution=64, channel_base=8192, channel_max=256, mapping_layers=4, spade_hidden=128),
        "G_label": LabelGenerator(z_dim=64, c_dim=32, w_dim=128, img_resolution=64, channel_base=4096, channel_max=128, mapping_layers=2),
        "D_img": ProjectionDiscriminator(4, 32, 64, channel_base=8192, channel_max=256, mapping_layers=8),
        "D_label": ProjectionDiscriminator(1, 32, 64, channel_base=4096, channel_max=128, mapping_layers=8),
    }


def test_generator_parameter_counts(nets):
    g_img, g_label = nets["G_img"], nets["G_label"]
    assert count(g_img) == 8_698_520
    assert count(g_img.mapping) == 304_384
    assert count(g_img.synthesis) == 8_394_136
    assert sum(count(b.spade) for b in g_img.synthesis.blocks) == 2_958_080
    assert count(g_label) == 1_406_542
    assert g_img.num_ws == g_label.num_ws == 10


def test_label_generator_with_the_original_w_dim_bug():
    g = LabelGenerator(z_dim=64, c_dim=32, w_dim=64)
    assert count(g) == 1_269_134
    assert count(g.mapping) == 14_528


def test_discriminator_parameter_counts(nets):
    for name, total, blocks, cmap, epilogue in [("D_img", 6_455_040, 4_213_248, 534_784, 1_707_008), ("D_label", 1_617_600, 1_053_760, 136_320, 427_520)]:
        d = nets[name]
        assert count(d) == total, name
        assert sum(count(b) for b in d.blocks) == blocks, name
        assert count(d.mapping) == cmap, name
        assert count(d.epilogue) == epilogue, name


def test_small_forward_at_64px(nets):
    c = torch.eye(32)[[0, 5]]
    with torch.no_grad():
        label = nets["G_label"](torch.randn(2, 64), c)
        image = nets["G_img"](torch.randn(2, 128), c, label.clamp(-1, 1))
        d_img = nets["D_img"](torch.cat([image, label], dim=1), c)
        d_label = nets["D_label"](label, c)
    assert label.shape == (2, 1, 64, 64) and image.shape == (2, 3, 64, 64)
    assert d_img.shape == d_label.shape == (2,)
    assert all(torch.isfinite(t).all() for t in (label, image, d_img, d_label))
