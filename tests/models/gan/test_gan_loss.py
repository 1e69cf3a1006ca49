"""GAN losses of the replay pair: style merging, the logistic losses' sign, R1 only when due."""

import torch

from relaylearn.models.gan import AdaptiveAugment, ImageGenerator, LabelGenerator, ProjectionDiscriminator
from relaylearn.models.gan.loss import (
    PairNetworks,
    discriminator_loss_image,
    discriminator_loss_label,
    generator_loss_image,
    generator_loss_label,
    merge_styles,
)


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
    (g_img, fake_img), (g_label, fake_label) = generator_loss_image(nets, seg, z_img, c), generator_loss_label(nets, z_label, c)
    assert g_img.ndim == 0 and g_img > 0 and g_label > 0
    assert fake_img.shape == (n, 3, 16, 16) and fake_label.shape == (n, 1, 16, 16) and fake_img.requires_grad
    for half in (
        discriminator_loss_image(nets, images, seg, fake_img, c, c[:, 0], with_r1=False),
        discriminator_loss_label(nets, seg, fake_label, c, c[:, 0], with_r1=False),
    ):
        assert half.r1 is None and half.loss > 0 and half.real_logits.shape == (n,)
        half.loss.backward()
    assert all(p.grad is None for p in [*nets.g_img.parameters(), *nets.g_label.parameters()])  # the fakes are taken detached
    for half in (
        discriminator_loss_image(nets, images, seg, fake_img, c, c[:, 0], with_r1=True),
        discriminator_loss_label(nets, seg, fake_label, c, c[:, 0], with_r1=True),
    ):
        assert half.r1 is not None and half.r1 >= 0 and half.r1.requires_grad


def test_discriminator_loss_and_r1_equal_separate_passes_over_fakes_and_reals():
    """One pass over fakes and reals per discriminator gives the losses, logits and R1 penalty of
    separate passes (ADA at p = 0 is the identity)."""
    import torch.nn.functional as F

    from relaylearn.models.gan.regularizers import r1_penalty

    nets, n = _nets(), 8
    torch.manual_seed(1)
    c = torch.nn.functional.one_hot(torch.randint(0, 3, (n, 1)), 3).float()
    seg, images = torch.rand(n, 1, 16, 16) * 2 - 1, torch.rand(n, 3, 16, 16) * 2 - 1
    z_label, z_img = torch.randn(n, 1, 8), torch.randn(n, 1, 8)
    with torch.no_grad():
        fake_label, fake_img = nets.g_label(z_label, c), nets.g_img(z_img, c, seg)
    image_half = discriminator_loss_image(nets, images, seg, fake_img, c, c[:, 0], with_r1=True)
    label_half = discriminator_loss_label(nets, seg, fake_label, c, c[:, 0], with_r1=True)
    real_img, real_seg = images.clone().requires_grad_(), seg.clone().requires_grad_()
    real_logits_img = nets.d_img(torch.cat([real_img, seg], 1), c[:, 0])
    real_logits_lab = nets.d_label(real_seg, c[:, 0])
    image = F.softplus(nets.d_img(torch.cat([fake_img, seg], 1), c[:, 0])).mean() + F.softplus(-real_logits_img).mean()
    label = F.softplus(nets.d_label(fake_label, c[:, 0])).mean() + F.softplus(-real_logits_lab).mean()
    r1_img, r1_lab = r1_penalty(real_logits_img, real_img).mean(), r1_penalty(real_logits_lab, real_seg).mean()
    expected = (
        (image_half.loss, image),
        (label_half.loss, label),
        (image_half.r1, r1_img),
        (label_half.r1, r1_lab),
        (image_half.real_logits, real_logits_img.detach()),
        (label_half.real_logits, real_logits_lab.detach()),
    )
    for a, b in expected:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
