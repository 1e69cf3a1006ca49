"""GAN losses of the replay pair: style merging, the logistic losses' sign, R1 only when due."""

import torch

from relaylearn.models.gan import AdaptiveAugment, ImageGenerator, LabelGenerator, ProjectionDiscriminator
from relaylearn.models.gan.loss import PairNetworks, discriminator_loss, generator_loss, merge_styles


def test_merge_styles_gives_one_hot_for_one_site_and_equal_weights_for_two():
    one = torch.nn.functional.one_hot(torch.tensor([[2, 2]]), 4).float()
    two = torch.nn.functional.one_hot(torch.tensor([[0, 3]]), 4).float()
    assert torch.equal(merge_styles(one), torch.tensor([[0.0, 0, 1, 0]]))
    assert torch.equal(merge_styles(two), torch.tensor([[1.0, 0, 0, 1]]))


def _nets():
    torch.manual_seed(0)
    return PairNetworks(
        g_label=LabelGenerator(8, 3, 16, img_resolution=16, channel_base=64, channel_max=8, mapping_layers=1),
        g_img=ImageGenerator(8, 3, 16, img_resolution=16, channel_base=128, channel_max=16, mapping_layers=1, spade_hidden=8),
        d_label=ProjectionDiscriminator(1, 3, img_resolution=16, channel_base=64, channel_max=8, mapping_layers=1),
        d_img=ProjectionDiscriminator(4, 3, img_resolution=16, channel_base=128, channel_max=16, mapping_layers=1),
        ada_label=AdaptiveAugment("bg", num_channels=1),
        ada_img=AdaptiveAugment("bgc", num_channels=4),
    )


def test_losses_are_positive_scalars_and_r1_is_computed_only_when_due():
    nets, n = _nets(), 4
    c = torch.nn.functional.one_hot(torch.zeros(n, 1, dtype=torch.long), 3).float()
    seg, images = torch.rand(n, 1, 16, 16) * 2 - 1, torch.rand(n, 3, 16, 16) * 2 - 1
    z_label, z_img = torch.randn(n, 1, 8), torch.randn(n, 1, 8)
    g_img, g_label = generator_loss(nets, seg, z_label, z_img, c)
    assert g_img.ndim == 0 and g_img > 0 and g_label > 0
    without = discriminator_loss(nets, images, seg, z_label, z_img, c, c[:, 0], with_r1=False)
    assert without.r1 is None and without.image > 0 and without.real_logits_image.shape == (n,)
    with_r1 = discriminator_loss(nets, images, seg, z_label, z_img, c, c[:, 0], with_r1=True)
    assert with_r1.r1 is not None and with_r1.r1 >= 0 and with_r1.r1.requires_grad
