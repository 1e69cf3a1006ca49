"""Losses of the replay GAN pair (label generator + image generator, one discriminator each),
beside the networks as StyleGAN2-ADA keeps ``loss.py`` beside ``networks.py``
(docs/method.md#one-batch).

Non-saturating logistic losses, the lazy R1 / path-length regularisers (weights and intervals
are the caller's), and the generator-alignment term. No optimiser steps and no schedules: the
relay strategy decides when each loss runs and with which weight.

Shapes: z_label [N,S,z_label] / z_img [N,S,z_img] (S = 1, or 2 with style mixing); site
one-hots c [N,S,K]; label maps seg [N,1,H,W] in [-1, 1]; images [N,C,H,W].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relaylearn.models.gan.regularizers import path_length_penalty, r1_penalty


@dataclass
class PairNetworks:
    """The GAN pair and the augmentation pipes its discriminators see through."""

    g_label: nn.Module
    g_img: nn.Module
    d_label: nn.Module
    d_img: nn.Module
    ada_label: nn.Module
    ada_img: nn.Module


@dataclass
class DiscriminatorLoss:
    image: Tensor  # scalar: logistic loss of the (image, label map) discriminator
    label: Tensor  # scalar: logistic loss of the label-map discriminator
    r1: Tensor | None  # scalar: mean R1 of both discriminators (None when not due)
    real_logits_image: Tensor  # [N]: for the ADA controller
    real_logits_label: Tensor  # [N]


def merge_styles(c: Tensor) -> Tensor:
    """Per-style one-hots [N,S,K] → one conditioning vector [N,K] for D (sum, / per-sample max)."""
    s = c.sum(1)
    return s / s.amax(1, keepdim=True).clamp_min(1e-8)


def generator_loss(nets: PairNetworks, seg: Tensor, z_label: Tensor, z_img: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``softplus(−D(aug(G(z, c))))`` for both generators → (image loss, label loss), scalars.
    The image generator draws on ``seg``, the (noisy) label maps of the mixed batch."""
    c_d = merge_styles(c)
    fake_label = nets.g_label(z_label, c)
    fake_img = nets.g_img(z_img, c, seg)
    loss_img = F.softplus(-nets.d_img(nets.ada_img(torch.cat([fake_img, seg], 1)), c_d)).mean()
    loss_label = F.softplus(-nets.d_label(nets.ada_label(fake_label), c_d)).mean()
    return loss_img, loss_label


def path_length_loss(
    nets: PairNetworks, seg: Tensor, z_label: Tensor, z_img: Tensor, c: Tensor, pl_mean_img: Tensor, pl_mean_label: Tensor, decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Path-length penalties of both generators on the samples given (the caller shrinks the
    batch) → (sum of both penalties, new image-G mean, new label-G mean)."""
    ws_img = nets.g_img.mapping(z_img, c, update_w_avg=False)
    out_img = nets.g_img.synthesize(ws_img, seg)
    pen_img, mean_img = path_length_penalty(lambda w: nets.g_img.synthesize(w, seg), ws_img, out_img, pl_mean_img, decay=decay)
    ws_lab = nets.g_label.mapping(z_label, c, update_w_avg=False)
    out_lab = nets.g_label.synthesize(ws_lab)
    pen_lab, mean_label = path_length_penalty(nets.g_label.synthesize, ws_lab, out_lab, pl_mean_label, decay=decay)
    return pen_img + pen_lab, mean_img, mean_label


def discriminator_loss(
    nets: PairNetworks, images: Tensor, seg: Tensor, z_label: Tensor, z_img: Tensor, c: Tensor, c_real: Tensor, with_r1: bool
) -> DiscriminatorLoss:
    """``softplus(D(aug(fake))) + softplus(−D(aug(real)))`` for both discriminators; fakes from
    the (frozen) generators on latents ``z_*`` / one-hots ``c``, reals ``images`` with label maps
    ``seg`` conditioned on ``c_real`` [N,K]; R1 on the un-augmented reals when ``with_r1``."""
    c_d = merge_styles(c)
    with torch.no_grad():
        fake_label = nets.g_label(z_label, c)
        fake_img = nets.g_img(z_img, c, seg)
    real_img = images.detach().requires_grad_(with_r1)
    real_seg = seg.detach().requires_grad_(with_r1)
    # fakes and reals through each discriminator in one pass (two independent chunks)
    c_both = torch.cat([c_d, c_real])
    pairs = torch.cat([torch.cat([fake_img, seg], 1), torch.cat([real_img, seg], 1)])
    fake_logits_img, real_logits_img = nets.d_img(nets.ada_img(pairs), c_both, chunks=2).chunk(2)
    label_maps = torch.cat([fake_label, real_seg])
    fake_logits_lab, real_logits_lab = nets.d_label(nets.ada_label(label_maps), c_both, chunks=2).chunk(2)
    loss_img = F.softplus(fake_logits_img).mean() + F.softplus(-real_logits_img).mean()
    loss_lab = F.softplus(fake_logits_lab).mean() + F.softplus(-real_logits_lab).mean()
    r1 = r1_penalty(real_logits_img, real_img).mean() + r1_penalty(real_logits_lab, real_seg).mean() if with_r1 else None
    return DiscriminatorLoss(loss_img, loss_lab, r1, real_logits_img.detach(), real_logits_lab.detach())


def alignment_loss(
    g_label: nn.Module,
    g_img: nn.Module,
    previous_g_label: nn.Module,
    previous_g_img: nn.Module,
    z_label: Tensor,
    z_img: Tensor,
    c: Tensor,
    quantize: Callable[[Tensor], Tensor],
) -> Tensor:
    """Generator alignment: mean L1 distance between the current and the frozen previous
    generators on the same latents z [N,z_dim], one-hots c [N,K] and constant noise, both in eval
    mode (as the next site replays them): label maps [N,1,H,W] plus images [N,C,H,W] drawn on the
    previous label map after ``quantize``. Zero for unchanged generators; the gradient reaches the
    current generators only."""
    with torch.no_grad():
        ref_label = previous_g_label(z_label, c, update_w_avg=False, noise_mode="const")
        seg = quantize(ref_label)
        ref_img = previous_g_img(z_img, c, seg, update_w_avg=False, noise_mode="const")
    was = g_label.training, g_img.training
    g_label.eval(), g_img.eval()  # SPADE's running statistics, as in replay
    try:
        label = g_label(z_label, c, update_w_avg=False, noise_mode="const")
        img = g_img(z_img, c, seg, update_w_avg=False, noise_mode="const")
    finally:
        g_label.train(was[0]), g_img.train(was[1])
    return F.l1_loss(label.float(), ref_label.float()) + F.l1_loss(img.float(), ref_img.float())
