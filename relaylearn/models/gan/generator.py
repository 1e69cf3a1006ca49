"""Conditional style-based generators of the replay GAN (docs/method.md#replay-gan).

* ``MappingNetwork``: (z, site one-hot c) → ws [N, num_ws, w_dim], with style mixing of two
  styles, a tracked average ``w_avg`` and truncation.
* ``SynthesisNetwork``: ws → image, from a learned 4×4 constant through one block per
  resolution 4, 8, …, ``img_resolution`` ("skip" architecture: every block has a toRGB whose
  output is added to the FIR-upsampled sum of the coarser ones). Optionally a ``SPADE`` module
  conditions every block's *input* on a 1-channel label map (at 4×4 on the constant, then on
  the 4, 8, …, res/2 features — the label never enters at full resolution, as in the original).
* ``LabelGenerator`` (z, c) → label map [N, 1, H, W] and ``ImageGenerator`` (z, c, seg) →
  image [N, 3, H, W]. Outputs are unbounded (roughly [-1, 1]); the caller clips replayed data.

Channels at resolution r: ``min(channel_base // r, channel_max)``. ``num_ws`` = 2·log2(res) − 2
(one w per conv layer plus one for the last toRGB; 10 at 64 px).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relaylearn.models.gan.layers import (
    EqualizedConv2d,
    EqualizedLinear,
    StyledConv2d,
    ToRGB,
    make_resample_kernel,
    upsample2d,
)
from relaylearn.models.gan.random import rand


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Scales each row of ``x`` [..., F] to unit mean square."""
    return x * (x.square().mean(dim=-1, keepdim=True) + eps).rsqrt()


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    """Feature channels used at ``resolution``: ``min(channel_base // resolution, channel_max)``."""
    return min(channel_base // resolution, channel_max)


def check_resolution(img_resolution: int) -> int:
    """Returns log2(img_resolution); raises ``ValueError`` unless it is a power of two ≥ 4."""
    log2 = int(round(math.log2(img_resolution))) if img_resolution > 0 else 0
    if img_resolution < 4 or 2**log2 != img_resolution:
        raise ValueError(f"img_resolution must be a power of two >= 4, got {img_resolution}")
    return log2


# ----------------------------------------------------------------------------------------------
# Mapping


class MappingNetwork(nn.Module):
    """(z, c) → w: normalised z ⊕ normalised embedding of c, then ``num_layers`` lrelu FC layers.

    Args:
        z_dim: latent size (0: c only, as in the discriminator's c-mapping).
        c_dim: conditioning size (0: unconditional).
        w_dim: output size.
        num_ws: number of w copies returned ([N, num_ws, w_dim]); ``None`` returns [N, w_dim]
            and disables style mixing and ``w_avg``.
        lr_multiplier: LR multiplier of the FC layers (the c embedding uses 1).
        w_avg_beta: EMA decay of the tracked average w (``None``: not tracked, no truncation).
    """

    def __init__(
        self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8, lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.995
    ):
        super().__init__()
        if z_dim <= 0 and c_dim <= 0:
            raise ValueError("MappingNetwork needs z_dim > 0 or c_dim > 0")
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.w_avg_beta = w_avg_beta if num_ws is not None else None
        self.embed = EqualizedLinear(c_dim, w_dim) if c_dim > 0 else None
        features = [z_dim + (w_dim if c_dim > 0 else 0)] + [w_dim] * num_layers
        self.layers = nn.ModuleList(EqualizedLinear(features[i], features[i + 1], activation="lrelu", lr_multiplier=lr_multiplier) for i in range(num_layers))
        if self.w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros(w_dim))

    def _check(self, name: str, t: Tensor | None, dim: int) -> Tensor | None:
        if dim == 0:
            return None
        if t is None or t.ndim not in (2, 3) or t.shape[-1] != dim:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"MappingNetwork: {name} must be [N, {dim}] or [N, S, {dim}], got {got}")
        return t

    def forward(self, z: Tensor | None, c: Tensor | None, truncation_psi: float = 1.0, update_w_avg: bool | None = None) -> Tensor:
        """z [N, z_dim] or [N, S, z_dim]; c one-hot [N, c_dim] or [N, S, c_dim] (S ∈ {1, 2}; a 2-D
        input next to a 3-D one is shared by all S styles).

        Returns ws [N, num_ws, w_dim] in fp32 (or [N, w_dim] when ``num_ws`` is None). With S = 2
        the first style fills the first ``1 + Binomial(num_ws − 2, ½)`` slots (drawn once per
        call), the second the rest. ``update_w_avg`` (default: ``self.training``) updates the
        ``w_avg`` EMA from this batch; ``truncation_psi`` < 1 pulls every w toward ``w_avg``.
        """
        z = self._check("z", z, self.z_dim)
        c = self._check("c", c, self.c_dim)
        if z is not None and c is not None and z.ndim != c.ndim:  # one per-sample input, shared by the styles
            styles = max(z.shape[1] if z.ndim == 3 else 1, c.shape[1] if c.ndim == 3 else 1)
            z = z if z.ndim == 3 else z.unsqueeze(1).expand(-1, styles, -1)
            c = c if c.ndim == 3 else c.unsqueeze(1).expand(-1, styles, -1)
        ref = z if z is not None else c
        if z is not None and c is not None and z.shape[:-1] != c.shape[:-1]:
            raise ValueError(f"MappingNetwork: z {tuple(z.shape)} and c {tuple(c.shape)} disagree on [N(, S)]")
        lead = ref.shape[:-1]
        parts = []
        if z is not None:
            parts.append(normalize_2nd_moment(z.reshape(-1, self.z_dim).float()))
        if c is not None:
            parts.append(normalize_2nd_moment(self.embed(c.reshape(-1, self.c_dim).float()).float()))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for layer in self.layers:
            x = layer(x)
        x = x.float()

        if update_w_avg is None:
            update_w_avg = self.training
        if update_w_avg and self.w_avg_beta is not None:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            if self.w_avg_beta is None:
                raise ValueError("MappingNetwork: truncation needs w_avg (num_ws and w_avg_beta set)")
            x = self.w_avg.lerp(x, truncation_psi)

        x = x.reshape(*lead, self.w_dim)
        if self.num_ws is None:
            return x
        if x.ndim == 2:
            return x.unsqueeze(1).expand(-1, self.num_ws, -1)
        return self._mix_styles(x)

    def _mix_styles(self, w: Tensor) -> Tensor:
        """w [N, S, w_dim] with S ∈ {1, 2} → ws [N, num_ws, w_dim] (no host synchronisation)."""
        styles = w.shape[1]
        if styles == 1:
            return w.expand(-1, self.num_ws, -1)
        if styles != 2 or self.num_ws < 2:
            raise ValueError(f"MappingNetwork: style mixing supports 2 styles and num_ws >= 2, got S={styles}")
        coin_flips = rand(self.num_ws - 2, device=w.device) < 0.5
        cutoff = 1 + coin_flips.sum()
        first_style = torch.arange(self.num_ws, device=w.device) < cutoff  # [num_ws]
        return torch.where(first_style[None, :, None], w[:, :1], w[:, 1:])

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


# ----------------------------------------------------------------------------------------------
# Synthesis


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: ``norm(x)·(1 + γ(seg)) + β(seg)``.

    ``norm`` is a parameter-free BatchNorm2d (batch statistics in training, running statistics
    in eval); ``seg`` [N, label_channels, H', W'] is nearest-resized to x's size and passed
    through a 3×3 conv + ReLU (``hidden`` channels) and two 3×3 convs giving γ and β.
    x [N, C, H, W] → same shape and dtype (normalisation and modulation in fp32).

    The three convolutions are plain ``nn.Conv2d`` with PyTorch's default init, as in SPADE and
    the original relay code; ``equalized_lr=True`` uses equalised-learning-rate convolutions
    instead (weights N(0, 1) scaled at run time), whose relative Adam step is far smaller.
    """

    def __init__(self, num_features: int, label_channels: int = 1, hidden: int = 128, equalized_lr: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        if equalized_lr:
            conv = lambda i, o: EqualizedConv2d(i, o, 3, activation="linear")  # noqa: E731
        else:
            conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1)  # noqa: E731
        self.shared = conv(label_channels, hidden)
        self.gamma = conv(hidden, num_features)
        self.beta = conv(hidden, num_features)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        seg = F.interpolate(seg.float(), size=x.shape[-2:], mode="nearest")
        hidden = F.relu(self.shared(seg))
        normalized = self.norm(x.float())
        out = normalized * (1 + self.gamma(hidden).float()) + self.beta(hidden).float()
        return out.to(x.dtype)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network.

    The first block (``in_channels == 0``) starts from a learned constant [C, 4, 4] and has one
    conv; the others upsample 2× in their first conv and have two. Every block ends with a
    toRGB; ``img`` accumulates the (FIR-upsampled) RGB outputs. Uses ``num_conv + 1`` ws.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
        conv_clamp: float | None,
        spade_hidden: int | None,
        label_channels: int,
        spade_equalized_lr: bool = False,
    ):
        super().__init__()
        self.resolution = resolution
        self.is_first = in_channels == 0
        self.num_conv = 1 if self.is_first else 2
        if self.is_first:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.conv0 = None
        else:
            self.conv0 = StyledConv2d(in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp)
        self.conv1 = StyledConv2d(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        self.to_rgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        feature_channels = out_channels if self.is_first else in_channels
        self.spade = SPADE(feature_channels, label_channels, spade_hidden, spade_equalized_lr) if spade_hidden else None
        if not self.is_first:
            self.register_buffer("resample_kernel", make_resample_kernel(), persistent=False)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, seg: Tensor | None, noise_mode: str) -> tuple[Tensor, Tensor]:
        """ws [N, num_conv + 1, w_dim] → (features, accumulated image)."""
        if self.is_first:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        if self.spade is not None:
            x = self.spade(x, seg)
        if self.conv0 is not None:
            x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode)
        rgb = self.to_rgb(x, ws[:, self.num_conv]).float()
        img = rgb if img is None else upsample2d(img, self.resample_kernel) + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    """ws [N, num_ws, w_dim] (+ seg [N, label_channels, H, W] when ``spade_hidden``) → image.

    Output [N, img_channels, img_resolution, img_resolution], fp32, unbounded.
    """

    def __init__(
        self,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int,
        channel_max: int,
        conv_clamp: float | None = 256,
        spade_hidden: int | None = None,
        label_channels: int = 1,
        spade_equalized_lr: bool = False,
    ):
        super().__init__()
        log2 = check_resolution(img_resolution)
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.uses_seg = bool(spade_hidden)
        self.label_channels = label_channels
        resolutions = [2**i for i in range(2, log2 + 1)]
        blocks = []
        for res in resolutions:
            in_ch = 0 if res == 4 else channels_at(res // 2, channel_base, channel_max)
            out_ch = channels_at(res, channel_base, channel_max)
            blocks.append(SynthesisBlock(in_ch, out_ch, w_dim, res, img_channels, conv_clamp, spade_hidden, label_channels, spade_equalized_lr))
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = sum(b.num_conv for b in blocks) + 1

    def forward(self, ws: Tensor, seg: Tensor | None = None, noise_mode: str = "random") -> Tensor:
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"SynthesisNetwork: ws must be [N, {self.num_ws}, {self.w_dim}], got {tuple(ws.shape)}")
        if self.uses_seg:
            if seg is None or seg.ndim != 4 or seg.shape[0] != ws.shape[0] or seg.shape[1] != self.label_channels:
                got = None if seg is None else tuple(seg.shape)
                raise ValueError(f"SynthesisNetwork: seg must be [{ws.shape[0]}, {self.label_channels}, H, W], got {got}")
        x = img = None
        w_idx = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + 1], seg, noise_mode)
            w_idx += block.num_conv
        return img


# ----------------------------------------------------------------------------------------------
# Generators


class _StyleGenerator(nn.Module):
    """Mapping + synthesis; shared by the label and the image generator."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int,
        img_channels: int,
        channel_base: int,
        channel_max: int,
        mapping_layers: int,
        conv_clamp: float | None,
        spade_hidden: int | None,
        label_channels: int,
        mapping_lr_multiplier: float,
        w_avg_beta: float,
        spade_equalized_lr: bool = False,
    ):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(
            w_dim,
            img_resolution,
            img_channels,
            channel_base,
            channel_max,
            conv_clamp=conv_clamp,
            spade_hidden=spade_hidden,
            label_channels=label_channels,
            spade_equalized_lr=spade_equalized_lr,
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws, num_layers=mapping_layers, lr_multiplier=mapping_lr_multiplier, w_avg_beta=w_avg_beta)


class LabelGenerator(_StyleGenerator):
    """(z, c) → continuous label map [N, img_channels(=1), R, R], roughly in [-1, 1].

    z [N, z_dim] or [N, S, z_dim]; c one-hot [N, c_dim] or [N, S, c_dim] (S = 2: style mixing).
    ``synthesize(ws)`` is the synthesis half, for the path-length penalty.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int = 64,
        channel_base: int = 4096,
        channel_max: int = 128,
        mapping_layers: int = 2,
        img_channels: int = 1,
        conv_clamp: float | None = 256,
        mapping_lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ):
        super().__init__(
            z_dim, c_dim, w_dim, img_resolution, img_channels, channel_base, channel_max, mapping_layers, conv_clamp, None, 1, mapping_lr_multiplier, w_avg_beta
        )

    def forward(self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, update_w_avg: bool | None = None, noise_mode: str = "random") -> Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, update_w_avg=update_w_avg)
        return self.synthesis(ws, noise_mode=noise_mode)

    def synthesize(self, ws: Tensor, noise_mode: str = "random") -> Tensor:
        """ws [N, num_ws, w_dim] → label map [N, img_channels, R, R]."""
        return self.synthesis(ws, noise_mode=noise_mode)


class ImageGenerator(_StyleGenerator):
    """(z, c, seg) → image [N, img_channels(=3), R, R], roughly in [-1, 1].

    ``seg`` [N, label_channels(=1), H, W] is the label map the image must follow (SPADE before
    every synthesis block; any H, W — it is nearest-resized). ``synthesize(ws, seg)`` is the
    synthesis half, for the path-length penalty. ``spade_equalized_lr``: see ``SPADE``.
    """

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        w_dim: int,
        img_resolution: int = 64,
        img_channels: int = 3,
        channel_base: int = 8192,
        channel_max: int = 256,
        mapping_layers: int = 4,
        spade_hidden: int = 128,
        label_channels: int = 1,
        conv_clamp: float | None = 256,
        mapping_lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
        spade_equalized_lr: bool = False,
    ):
        if spade_hidden <= 0:
            raise ValueError(f"ImageGenerator: spade_hidden must be positive, got {spade_hidden}")
        super().__init__(
            z_dim,
            c_dim,
            w_dim,
            img_resolution,
            img_channels,
            channel_base,
            channel_max,
            mapping_layers,
            conv_clamp,
            spade_hidden,
            label_channels,
            mapping_lr_multiplier,
            w_avg_beta,
            spade_equalized_lr,
        )

    def forward(self, z: Tensor, c: Tensor, seg: Tensor, truncation_psi: float = 1.0, update_w_avg: bool | None = None, noise_mode: str = "random") -> Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, update_w_avg=update_w_avg)
        return self.synthesis(ws, seg, noise_mode=noise_mode)

    def synthesize(self, ws: Tensor, seg: Tensor, noise_mode: str = "random") -> Tensor:
        """ws [N, num_ws, w_dim], seg [N, label_channels, H, W] → image [N, img_channels, R, R]."""
        return self.synthesis(ws, seg, noise_mode=noise_mode)
