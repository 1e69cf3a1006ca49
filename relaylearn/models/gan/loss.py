"""Losses of the replay GAN pair (label generator + image generator, one discriminator each),
beside the networks as StyleGAN2-ADA keeps ``loss.py`` beside ``networks.py``
(docs/method.md#one-batch).

Non-saturating logistic losses, the lazy R1 / path-length regularisers (weights and intervals
are the caller's), and the generator-alignment term, each per pair (``*_image``: the image
generator and the (image, label map) discriminator; ``*_label``: the label-map pair), as the two
pairs share no parameter. No optimiser steps and no schedules: the relay strategy decides when
each loss runs and with which weight.

Shapes: z_label [N,S,z_label] / z_img [N,S,z_img] (S = 1, or 2 with style mixing); site
one-hots c [N,S,K]; label maps seg [N,1,H,W] in [-1, 1]; images [N,C,H,W].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relaylearn.models import in_eval_mode
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


def merge_styles(c: Tensor) -> Tensor:
    """Per-style one-hots [N,S,K] → one conditioning vector [N,K] for D (sum, / per-sample max)."""
    s = c.sum(1)
    return s / s.amax(1, keepdim=True).clamp_min(1e-8)


def generator_loss_image(nets: PairNetworks, seg: Tensor, z_img: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``softplus(−D_img(aug(G_img(z, c, seg), seg)))`` (scalar) and the fakes [N,C,H,W]: the image
    generator draws on ``seg``, the (noisy) label maps of the mixed batch. Touches the image pair only."""
    fake_img = nets.g_img(z_img, c, seg)
    return F.softplus(-nets.d_img(nets.ada_img(torch.cat([fake_img, seg], 1)), merge_styles(c))).mean(), fake_img


def generator_loss_label(nets: PairNetworks, z_label: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``softplus(−D_label(aug(G_label(z, c))))`` (scalar) and the fake label maps [N,1,H,W].
    Touches the label-map pair only."""
    fake_label = nets.g_label(z_label, c)
    return F.softplus(-nets.d_label(nets.ada_label(fake_label), merge_styles(c))).mean(), fake_label


def path_length_loss_image(nets: PairNetworks, seg: Tensor, z_img: Tensor, c: Tensor, pl_mean: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """Path-length penalty of the image generator on the samples given → (penalty, new mean)."""
    ws = nets.g_img.mapping(z_img, c, update_w_avg=False)
    return path_length_penalty(lambda w: nets.g_img.synthesize(w, seg), ws, nets.g_img.synthesize(ws, seg), pl_mean, decay=decay)


def path_length_loss_label(nets: PairNetworks, z_label: Tensor, c: Tensor, pl_mean: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """Path-length penalty of the label generator on the samples given → (penalty, new mean)."""
    ws = nets.g_label.mapping(z_label, c, update_w_avg=False)
    return path_length_penalty(nets.g_label.synthesize, ws, nets.g_label.synthesize(ws), pl_mean, decay=decay)


@dataclass
class DiscriminatorLoss:
    """One discriminator's D-step loss, with what the step needs beside it."""

    loss: Tensor  # scalar logistic loss
    r1: Tensor | None  # scalar mean R1 (None when not due)
    real_logits: Tensor  # [N], detached


def discriminator_loss_image(nets: PairNetworks, images: Tensor, seg: Tensor, fake_img: Tensor, c: Tensor, c_real: Tensor, with_r1: bool) -> DiscriminatorLoss:
    """The (image, label map) discriminator's logistic loss on the fakes ``fake_img`` [N,C,H,W]
    (the image generator's on ``seg`` with one-hots ``c`` [N,S,K]; no gradient reaches the
    generator) and on the reals ``images`` with ``seg``; R1 on the un-augmented real images when
    ``with_r1``. Fakes and reals go through D in one pass (two chunks)."""
    real_img = images.detach().requires_grad_(with_r1)
    pairs = torch.cat([torch.cat([fake_img.detach(), seg], 1), torch.cat([real_img, seg], 1)])
    fake_logits, real_logits = nets.d_img(nets.ada_img(pairs), torch.cat([merge_styles(c), c_real]), chunks=2).chunk(2)
    loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    return DiscriminatorLoss(loss, r1_penalty(real_logits, real_img).mean() if with_r1 else None, real_logits.detach())


def discriminator_loss_label(nets: PairNetworks, seg: Tensor, fake_label: Tensor, c: Tensor, c_real: Tensor, with_r1: bool) -> DiscriminatorLoss:
    """The label-map discriminator's logistic loss on the label generator's fakes ``fake_label``
    [N,1,H,W] (one-hots ``c`` [N,S,K]; no gradient reaches the generator) and on the real label
    maps ``seg``; R1 on them when ``with_r1``."""
    real_seg = seg.detach().requires_grad_(with_r1)
    fake_logits, real_logits = nets.d_label(nets.ada_label(torch.cat([fake_label.detach(), real_seg])), torch.cat([merge_styles(c), c_real]), chunks=2).chunk(2)
    loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    return DiscriminatorLoss(loss, r1_penalty(real_logits, real_seg).mean() if with_r1 else None, real_logits.detach())


def alignment_references(
    previous_g_label: nn.Module, previous_g_img: nn.Module, z_label: Tensor, z_img: Tensor, c: Tensor, quantize: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """What the frozen previous generators make on latents z [N,z_dim], one-hots c [N,K] and
    constant noise: (label maps [N,1,H,W], those label maps after ``quantize``, images [N,C,H,W]
    drawn on the quantized maps), without gradients."""
    with torch.no_grad():
        ref_label = previous_g_label(z_label, c, update_w_avg=False, noise_mode="const")
        seg = quantize(ref_label)
        return ref_label, seg, previous_g_img(z_img, c, seg, update_w_avg=False, noise_mode="const")


def alignment_loss_label(g_label: nn.Module, z_label: Tensor, c: Tensor, ref_label: Tensor) -> Tensor:
    """Mean L1 distance of the current label generator's maps (eval mode, constant noise) to ``ref_label``."""
    with in_eval_mode(g_label):  # SPADE's running statistics, as in replay
        label = g_label(z_label, c, update_w_avg=False, noise_mode="const")
    return F.l1_loss(label.float(), ref_label.float())


def alignment_loss_image(g_img: nn.Module, z_img: Tensor, c: Tensor, seg: Tensor, ref_img: Tensor) -> Tensor:
    """Mean L1 distance of the current image generator's images on ``seg`` (eval mode, constant noise) to ``ref_img``."""
    with in_eval_mode(g_img):
        img = g_img(z_img, c, seg, update_w_avg=False, noise_mode="const")
    return F.l1_loss(img.float(), ref_img.float())
