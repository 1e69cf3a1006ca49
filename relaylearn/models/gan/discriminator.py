"""Projection-conditioned ResNet discriminator of the replay GAN (docs/method.md#replay-gan).

Layout at input resolution R (R = 64: blocks at 64, 32, 16, 8)::

    fromRGB 1×1 (first block only) → per block: [3×3 conv, 3×3 conv with 2× FIR downsampling]
    + 1×1 downsampling skip, summed with gain √½ → epilogue at 4×4: minibatch-stddev,
    3×3 conv, FC, FC to cmap_dim → logit = <out, cmap(c)> / √cmap_dim

``cmap`` is an 8-layer mapping network of the (one- or two-hot) site vector c.
Channels at resolution r: ``min(channel_base // r, channel_max)``; ``cmap_dim`` defaults to the
channels at 4×4.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from relaylearn.models.gan.generator import MappingNetwork, channels_at, check_resolution
from relaylearn.models.gan.layers import EqualizedConv2d, EqualizedLinear, MinibatchStdDev

SKIP_GAIN = math.sqrt(0.5)


class DiscriminatorBlock(nn.Module):
    """Residual block halving the resolution: [N, tmp, R, R] → [N, out, R/2, R/2].

    The first block (``in_channels == 0``) reads the image through a 1×1 fromRGB.
    """

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, img_channels: int, conv_clamp: float | None):
        super().__init__()
        self.from_rgb = EqualizedConv2d(img_channels, tmp_channels, 1, activation="lrelu", conv_clamp=conv_clamp) if in_channels == 0 else None
        self.conv0 = EqualizedConv2d(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = EqualizedConv2d(tmp_channels, out_channels, 3, activation="lrelu", down=True, conv_clamp=conv_clamp)
        self.skip = EqualizedConv2d(tmp_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.from_rgb is not None:
            x = self.from_rgb(x)
        shortcut = self.skip(x, gain=SKIP_GAIN)
        return shortcut + self.conv1(self.conv0(x), gain=SKIP_GAIN)


class DiscriminatorEpilogue(nn.Module):
    """[N, C, 4, 4] features (+ cmap [N, cmap_dim]) → logits [N] (fp32)."""

    def __init__(self, channels: int, cmap_dim: int, resolution: int, mbstd_group: int, mbstd_channels: int, conv_clamp: float | None):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStdDev(mbstd_group, mbstd_channels) if mbstd_channels > 0 else None
        self.conv = EqualizedConv2d(channels + mbstd_channels, channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.fc = EqualizedLinear(channels * resolution * resolution, channels, activation="lrelu")
        self.out = EqualizedLinear(channels, cmap_dim if cmap_dim > 0 else 1)

    def forward(self, x: Tensor, cmap: Tensor | None, chunks: int = 1) -> Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x, chunks)
        x = self.conv(x)
        x = self.out(self.fc(x.flatten(1))).float()
        if cmap is None:
            return x[:, 0]
        return (x * cmap.float()).sum(dim=1) / math.sqrt(self.cmap_dim)


class ProjectionDiscriminator(nn.Module):
    """x [N, img_channels, R, R], c [N, c_dim] (one- or two-hot) → real/fake logits [N] (fp32).

    With ``c_dim == 0`` the discriminator is unconditional (a plain output FC to 1). ``chunks``:
    x holds that many equal, independent batches one after another (e.g. fakes, then reals); the
    logits equal those of one call per chunk (the minibatch statistics stay within a chunk), with
    one pass through the network.
    """

    def __init__(
        self,
        img_channels: int,
        c_dim: int,
        img_resolution: int = 64,
        channel_base: int = 8192,
        channel_max: int = 256,
        mapping_layers: int = 8,
        mbstd_group: int = 4,
        mbstd_channels: int = 1,
        cmap_dim: int | None = None,
        conv_clamp: float | None = 256,
        mapping_lr_multiplier: float = 0.01,
    ):
        super().__init__()
        log2 = check_resolution(img_resolution)
        if img_resolution < 8:
            raise ValueError(f"ProjectionDiscriminator: img_resolution must be >= 8, got {img_resolution}")
        self.img_channels, self.c_dim, self.img_resolution = img_channels, c_dim, img_resolution
        blocks = []
        for res in (2**i for i in range(log2, 2, -1)):
            in_ch = 0 if res == img_resolution else channels_at(res, channel_base, channel_max)
            blocks.append(
                DiscriminatorBlock(
                    in_ch, channels_at(res, channel_base, channel_max), channels_at(res // 2, channel_base, channel_max), img_channels, conv_clamp
                )
            )
        self.blocks = nn.ModuleList(blocks)
        channels_4 = channels_at(4, channel_base, channel_max)
        self.cmap_dim = (cmap_dim or channels_4) if c_dim > 0 else 0
        self.mapping = (
            MappingNetwork(0, c_dim, self.cmap_dim, num_ws=None, num_layers=mapping_layers, lr_multiplier=mapping_lr_multiplier, w_avg_beta=None)
            if c_dim > 0
            else None
        )
        self.epilogue = DiscriminatorEpilogue(channels_4, self.cmap_dim, 4, mbstd_group, mbstd_channels, conv_clamp)

    def forward(self, x: Tensor, c: Tensor | None = None, chunks: int = 1) -> Tensor:
        expected = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ProjectionDiscriminator: x must be [N, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        cmap = None
        if self.mapping is not None:
            if c is None or c.ndim != 2 or c.shape != (x.shape[0], self.c_dim):
                got = None if c is None else tuple(c.shape)
                raise ValueError(f"ProjectionDiscriminator: c must be [{x.shape[0]}, {self.c_dim}], got {got}")
            cmap = self.mapping(None, c)
        if x.shape[0] % chunks:
            raise ValueError(f"ProjectionDiscriminator: a batch of {x.shape[0]} does not split into {chunks} equal chunks")
        for block in self.blocks:
            x = block(x)
        return self.epilogue(x, cmap, chunks)
