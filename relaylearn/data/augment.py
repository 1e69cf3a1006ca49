"""Batch augmentation of image / label-map pairs on the GPU or CPU, built on kornia.

``SegmentationAugment`` replaces the original's imgaug pipeline (docs/method.md#augmentation) and
draws one random transform per sample. The ``"original"`` preset mirrors it as a sequence of
three blocks; each block is active for a sample with probability ``p`` and then applies a random
subset of ``min_ops``..``max_ops`` of its operations, in the listed order:

* colour (p 0.5, 1–2 of): invert (itself p 0.5), hue & saturation ×[0.5, 1.5] (3-channel
  images only), brightness ×[0.7, 1.3], gamma [0.7, 1.7];
* degradation (p 0.3, 1–3 of): motion blur (kernel 3), Gaussian blur σ∈[0, 0.5], sharpen,
  additive Gaussian noise σ∈[0.01, 0.05], JPEG quality 75–99;
* geometry (p 0.5, 1–3 of): h-flip (p 0.5), v-flip (p 0.5), rotation ±90°, x/y scale
  [0.7, 1.3], x/y translation ±20 %, x/y shear ±15°.

Intensity operations work on 0..1 (``out_range`` mapped linearly); blur sizes are given for the
original 64-pixel images and scale with ``min(H, W) / 64``. The selected geometric operations
are composed into one affine matrix per sample and applied once: bilinear for images and nearest
for labels, so labels stay valid class ids and aligned with the image. Outside the frame
(``image_fill``): ``"min"`` gives the ``out_range`` minimum, i.e. black, as imgaug's default
``cval=0``, and class 0; ``"border"`` / ``"reflection"`` pad image and label alike (the edge
pixel repeated / the image mirrored), so a mirrored lesion keeps its class.

Randomness comes from torch's global generator on the input's device, so results repeat under
``torch.manual_seed``. On accelerators every operation runs on the whole batch and is blended
per sample with ``torch.where`` (no host synchronisation); on the CPU expensive operations run
only on the samples that use them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from kornia.color import hsv_to_rgb, rgb_to_hsv
from kornia.enhance import jpeg_codec_differentiable, sharpness
from kornia.filters import gaussian_blur2d, motion_blur
from kornia.geometry.transform import warp_affine
from torch import Tensor, nn

from relaylearn.errors import ConfigError

REFERENCE_SIZE = 64  # resolution the original's blur settings were made for


@dataclass(frozen=True)
class Block:
    """With probability ``p`` per sample, apply ``min_ops``..``max_ops`` distinct ops of ``ops``."""

    p: float
    min_ops: int
    max_ops: int
    ops: tuple[str, ...]


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the operations; intensities on a 0..1 scale, blur in pixels at 64 px."""

    invert_p: float = 0.5
    hue_saturation: tuple[float, float] = (0.5, 1.5)  # multiplies hue angle and saturation
    brightness: tuple[float, float] = (0.7, 1.3)  # multiplies intensity
    gamma: tuple[float, float] = (0.7, 1.7)  # intensity ** gamma
    motion_kernel: int = 3
    gaussian_sigma: tuple[float, float] = (0.0, 0.5)
    sharpen: tuple[float, float] = (1.0, 2.0)  # kornia sharpness factor (1 = unchanged)
    noise_sigma: tuple[float, float] = (0.01, 0.05)
    jpeg_quality: tuple[float, float] = (75.0, 99.0)
    flip_p: float = 0.5
    rotate_deg: float = 90.0
    scale: tuple[float, float] = (0.7, 1.3)  # independent in x and y
    translate: float = 0.2  # fraction of width / height
    shear_deg: float = 15.0


COLOUR_OPS = ("invert", "hue_saturation", "brightness", "gamma")
DEGRADE_OPS = ("motion_blur", "gaussian_blur", "sharpen", "noise", "jpeg")
GEOMETRY_OPS = ("hflip", "vflip", "rotate", "scale", "translate", "shear")
RGB_ONLY_OPS = ("hue_saturation", "jpeg")

PRESETS: dict[str, tuple[dict[str, Block], AugmentParams]] = {
    "original": (
        {"colour": Block(0.5, 1, 2, COLOUR_OPS), "degrade": Block(0.3, 1, 3, DEGRADE_OPS), "geometry": Block(0.5, 1, 3, GEOMETRY_OPS)},
        AugmentParams(),
    ),
    "light": (
        {
            "colour": Block(0.5, 1, 2, ("hue_saturation", "brightness", "gamma")),
            "geometry": Block(0.5, 1, 3, ("hflip", "vflip", "rotate", "scale", "translate")),
        },
        AugmentParams(hue_saturation=(0.9, 1.1), brightness=(0.9, 1.1), gamma=(0.85, 1.2), rotate_deg=15.0, scale=(0.9, 1.1), translate=0.05),
    ),
    "none": ({}, AugmentParams()),
}
IMAGE_FILLS = ("min", "border", "reflection")
#: allowed range of an :class:`AugmentParams` field (both ends included); any other field: 0 or more
PARAM_RANGES = {
    "invert_p": (0.0, 1.0),
    "flip_p": (0.0, 1.0),
    "jpeg_quality": (1.0, 100.0),
    "motion_kernel": (1.0, 64.0),  # pixels at 64 px
    "gaussian_sigma": (0.0, 16.0),  # the kernel grows with it
    "rotate_deg": (0.0, 180.0),
    "shear_deg": (0.0, 80.0),  # tan(90°) is infinite
    "translate": (0.0, 1.0),
    "scale": (0.01, 100.0),
}


def _number(value: Any, key: str, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` as a float in [low, high]; ConfigError naming ``augment.<key>`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"augment.{key}: expected a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"augment.{key}: must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _pair(value: Any, key: str, low: float = -math.inf, high: float = math.inf) -> tuple[float, float]:
    """``value`` as (lower, upper) with lower ≤ upper, both in [low, high]."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"augment.{key}: expected [lower, upper], got {value!r}")
    lower, upper = (_number(v, key, low, high) for v in value)
    if lower > upper:
        raise ConfigError(f"augment.{key}: the lower bound {lower:g} is above the upper one {upper:g}")
    return lower, upper


def _mapping(value: Any, key: str) -> dict:
    """``value`` as a mapping (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"augment.{key}: expected a mapping, got {value!r}")
    return value


def _param(key: str, value: Any) -> Any:
    """One checked :class:`AugmentParams` override (the type of its default, in ``PARAM_RANGES``)."""
    low, high = PARAM_RANGES.get(key, (0.0, math.inf))
    default = getattr(AugmentParams(), key)
    if isinstance(default, tuple):
        return _pair(value, f"params.{key}", low, high)
    number = _number(value, f"params.{key}", low, high)
    return int(number) if isinstance(default, int) else number


def _uniform(bounds: tuple[float, float], size: int, device: torch.device) -> Tensor:
    low, high = bounds
    return torch.rand(size, device=device) * (high - low) + low


def _on_selected(selected: Tensor, images: Tensor, op: Callable[..., Tensor], *per_sample: Tensor, compute_all: bool | None = None) -> Tensor:
    """Apply ``op(images, *per_sample)`` to the samples where ``selected`` [B] is true.

    ``compute_all`` (default: on accelerators) runs the op on the whole batch and blends with
    ``torch.where``, avoiding a host sync; otherwise (default on the CPU, where synchronising is
    free) only the selected samples are computed and written into ``images`` in place.
    """
    if compute_all is None:
        compute_all = images.device.type != "cpu"
    if compute_all:
        return torch.where(selected[:, None, None, None], op(images, *per_sample), images)
    index = selected.nonzero().squeeze(1)
    if index.numel() == 0:
        return images
    images[index] = op(images[index], *(p[index] for p in per_sample)).to(images.dtype)
    return images


def _odd(value: float) -> int:
    return 2 * int(value // 2) + 1


class SegmentationAugment(nn.Module):
    """Random per-sample augmentation of ``images`` [B, C, H, W] in ``out_range`` and ``labels`` [B, H, W].

    ``strength``: ``"original"`` (§4.4 blocks), ``"light"`` (flips, small affine, mild colour),
    ``"none"`` (identity). ``block_p`` overrides block probabilities by name (``colour``,
    ``degrade``, ``geometry``), ``params`` overrides fields of :class:`AugmentParams`.
    ``image_fill``: ``"min"`` (out-of-frame pixels = ``out_range`` minimum, label 0), ``"border"`` or
    ``"reflection"`` (image and label padded alike). ``compute_all``: run expensive ops on the whole batch and blend (no host
    sync; default on accelerators) or only on the samples that use them (default on the CPU).
    Both give the same result.
    """

    def __init__(
        self,
        strength: str = "original",
        out_range: tuple[float, float] = (-1.0, 1.0),
        *,
        block_p: dict[str, float] | None = None,
        params: dict[str, Any] | None = None,
        image_fill: str = "min",
        compute_all: bool | None = None,
    ):
        super().__init__()
        if not isinstance(strength, str) or strength not in PRESETS:
            raise ConfigError(f"augment: unknown strength {strength!r} (expected one of {', '.join(PRESETS)})")
        if not isinstance(image_fill, str) or image_fill not in IMAGE_FILLS:
            raise ConfigError(f"augment: unknown image_fill {image_fill!r} (expected one of {', '.join(IMAGE_FILLS)})")
        blocks, defaults = PRESETS[strength]
        blocks = dict(blocks)
        for name, p in _mapping(block_p, "block_p").items():
            if name not in blocks:
                raise ConfigError(f"augment.block_p: no block '{name}' in preset '{strength}' (has {', '.join(blocks) or 'none'})")
            blocks[name] = replace(blocks[name], p=_number(p, f"block_p.{name}", 0.0, 1.0))
        known = {f.name for f in fields(AugmentParams)}
        for key in _mapping(params, "params"):
            if key not in known:
                raise ConfigError(f"augment.params: unknown key '{key}' (known: {', '.join(sorted(known))})")
        self.strength = strength
        self.blocks = blocks
        self.params = replace(defaults, **{key: _param(key, value) for key, value in _mapping(params, "params").items()})
        self.out_range = _pair(out_range, "out_range")
        if self.out_range[0] == self.out_range[1]:
            raise ConfigError(f"augment.out_range: the lower bound must be below the upper one, got {list(out_range)}")
        self.image_fill = image_fill
        self.compute_all = compute_all

    def extra_repr(self) -> str:
        return f"strength={self.strength!r}, out_range={self.out_range}, image_fill={self.image_fill!r}"

    # ----- selection --------------------------------------------------------------------------
    @staticmethod
    def _select(block: Block, batch: int, channels: int, device: torch.device) -> dict[str, Tensor]:
        """Per-sample choice of the block's ops: ``{op: bool [batch]}``.

        RGB-only ops are unavailable for other channel counts; the number of ops drawn is capped
        by the number available.
        """
        unavailable = [i for i, op in enumerate(block.ops) if channels != 3 and op in RGB_ONLY_OPS]
        num_available = len(block.ops) - len(unavailable)
        active = torch.rand(batch, device=device) < block.p
        count = torch.randint(min(block.min_ops, num_available), min(block.max_ops, num_available) + 1, (batch,), device=device)
        # Random ranks of the ops; unavailable ones rank last, so ``rank < count`` never picks them.
        keys = torch.rand(batch, len(block.ops), device=device)
        for i in unavailable:
            keys[:, i] += 1.0
        ranks = keys.argsort(dim=1).argsort(dim=1)
        chosen = active[:, None] & (ranks < count[:, None])
        return {op: chosen[:, i] for i, op in enumerate(block.ops)}

    def _on(self, selected: Tensor, images: Tensor, op: Callable[..., Tensor], *per_sample: Tensor) -> Tensor:
        return _on_selected(selected, images, op, *per_sample, compute_all=self.compute_all)

    # ----- intensity --------------------------------------------------------------------------
    def _intensity(self, op: str, unit: Tensor, selected: Tensor) -> Tensor:
        """One intensity op on ``unit`` [B, C, H, W] in 0..1 for the ``selected`` samples."""
        prm, batch, device = self.params, unit.shape[0], unit.device
        resolution = min(unit.shape[-2:]) / REFERENCE_SIZE
        if op == "invert":
            flip = selected & (torch.rand(batch, device=device) < prm.invert_p)
            return self._on(flip, unit, lambda x: 1.0 - x)
        if op == "brightness":
            factor = torch.where(selected, _uniform(prm.brightness, batch, device), 1.0)
            return (unit * factor[:, None, None, None]).clamp_(0.0, 1.0)
        if op == "gamma":
            return self._on(selected, unit, lambda x, g: x.pow(g[:, None, None, None]), _uniform(prm.gamma, batch, device))
        if op == "hue_saturation":
            return self._on(selected, unit, _multiply_hue_saturation, _uniform(prm.hue_saturation, batch, device))
        if op == "motion_blur":
            kernel = max(3, _odd(prm.motion_kernel * resolution))
            angle = torch.rand(batch, device=device) * 360.0
            direction = torch.rand(batch, device=device) * 2.0 - 1.0
            return self._on(selected, unit, lambda x, a, d: motion_blur(x, kernel, a, d, border_type="reflect"), angle, direction)
        if op == "gaussian_blur":
            sigma = _uniform(prm.gaussian_sigma, batch, device).mul_(resolution).clamp_(min=1e-3)
            kernel = max(3, _odd(2 * math.ceil(3 * prm.gaussian_sigma[1] * resolution) + 1))
            return self._on(selected, unit, lambda x, s: gaussian_blur2d(x, kernel, s[:, None].expand(-1, 2)), sigma)
        if op == "sharpen":
            return self._on(selected, unit, lambda x, f: sharpness(x, f).clamp(0.0, 1.0), _uniform(prm.sharpen, batch, device))
        if op == "noise":  # one noise map for all channels (imgaug's per_channel=False)
            sigma = _uniform(prm.noise_sigma, batch, device)
            noise = torch.randn((batch, 1, *unit.shape[2:]), device=device, dtype=unit.dtype)
            return self._on(selected, unit, lambda x, s, n: (x + s[:, None, None, None] * n).clamp(0.0, 1.0), sigma, noise)
        if op == "jpeg":
            return self._on(selected, unit, lambda x, q: jpeg_codec_differentiable(x, q).clamp(0.0, 1.0), _uniform(prm.jpeg_quality, batch, device))
        raise ValueError(f"unknown intensity op {op}")

    # ----- geometry ---------------------------------------------------------------------------
    def _affine(self, chosen: dict[str, Tensor], batch: int, height: int, width: int, device: torch.device) -> Tensor:
        """Per-sample forward affine matrices [B, 2, 3] in pixel coordinates (identity where unchosen)."""
        prm = self.params

        def pick(op: str, value: Tensor, identity: float) -> Tensor:
            """``value`` where ``op`` was chosen, else the identity (also for ops not in the block)."""
            mask = chosen.get(op)
            return torch.full_like(value, identity) if mask is None else torch.where(mask, value, identity)

        def flip(op: str) -> Tensor:
            flipped = torch.rand(batch, device=device) < prm.flip_p
            return 1.0 - 2.0 * (flipped & chosen.get(op, torch.zeros_like(flipped))).float()

        fx, fy = flip("hflip"), flip("vflip")
        angle = pick("rotate", (torch.rand(batch, device=device) * 2 - 1) * math.radians(prm.rotate_deg), 0.0)
        sx = pick("scale", _uniform(prm.scale, batch, device), 1.0)
        sy = pick("scale", _uniform(prm.scale, batch, device), 1.0)
        tx = pick("translate", (torch.rand(batch, device=device) * 2 - 1) * prm.translate * width, 0.0)
        ty = pick("translate", (torch.rand(batch, device=device) * 2 - 1) * prm.translate * height, 0.0)
        shx = pick("shear", (torch.rand(batch, device=device) * 2 - 1) * math.radians(prm.shear_deg), 0.0).tan()
        shy = pick("shear", (torch.rand(batch, device=device) * 2 - 1) * math.radians(prm.shear_deg), 0.0).tan()

        # A = rotation · shear · scale · flip, about the image centre.
        cos, sin = angle.cos(), angle.sin()
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shear = torch.stack([torch.stack([torch.ones_like(shx), shx], -1), torch.stack([shy, torch.ones_like(shy)], -1)], -2)
        scale_flip = torch.diag_embed(torch.stack([sx * fx, sy * fy], -1))
        linear = rotation @ shear @ scale_flip
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0  # python floats: no host-to-device copy
        offset_x = cx - (linear[:, 0, 0] * cx + linear[:, 0, 1] * cy) + tx
        offset_y = cy - (linear[:, 1, 0] * cx + linear[:, 1, 1] * cy) + ty
        return torch.cat([linear, torch.stack([offset_x, offset_y], -1)[..., None]], dim=-1)

    def _warp(self, unit: Tensor, labels: Tensor, chosen: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        batch, _, height, width = unit.shape
        matrix = self._affine(chosen, batch, height, width, unit.device)
        moved = torch.stack(list(chosen.values()), 0).any(0)
        padding = "zeros" if self.image_fill == "min" else self.image_fill
        both = torch.cat([unit, labels[:, None].to(unit.dtype)], dim=1)

        def warp(x: Tensor, m: Tensor) -> Tensor:
            image = warp_affine(x[:, :-1], m, (height, width), mode="bilinear", padding_mode=padding, align_corners=True)
            label = warp_affine(x[:, -1:], m, (height, width), mode="nearest", padding_mode=padding, align_corners=True)
            return torch.cat([image, label], dim=1)

        both = self._on(moved, both, warp, matrix)
        return both[:, :-1].clamp_(0.0, 1.0), both[:, -1].round().to(labels.dtype)

    # ----- forward ----------------------------------------------------------------------------
    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Augment ``images`` [B, C, H, W] (in ``out_range``) and ``labels`` [B, H, W] (class ids).

        Returns tensors of the same shapes, dtypes and device; images clipped to ``out_range``.
        """
        if not self.blocks:
            return images, labels
        if images.ndim != 4 or labels.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"expected images [B, C, H, W] and labels [B, H, W], got {tuple(images.shape)} and {tuple(labels.shape)}")
        low, high = self.out_range
        batch, channels = images.shape[:2]
        unit = ((images.float() - low) / (high - low)).clamp_(0.0, 1.0)
        for name, block in self.blocks.items():
            chosen = self._select(block, batch, channels, images.device)
            if name == "geometry":
                unit, labels = self._warp(unit, labels, chosen)
            else:
                for op in block.ops:
                    unit = self._intensity(op, unit, chosen[op])
        out = unit.clamp_(0.0, 1.0) * (high - low) + low
        return out.to(images.dtype), labels


def _multiply_hue_saturation(rgb: Tensor, factor: Tensor) -> Tensor:
    """Multiply hue angle (wrapping) and saturation of RGB [B, 3, H, W] in 0..1 by ``factor`` [B]."""
    hsv = rgb_to_hsv(rgb)
    f = factor[:, None, None]
    hue = torch.remainder(hsv[:, 0] * f, 2 * math.pi)
    saturation = (hsv[:, 1] * f).clamp(0.0, 1.0)
    return hsv_to_rgb(torch.stack([hue, saturation, hsv[:, 2]], dim=1)).clamp(0.0, 1.0)


def from_config(spec: str | dict[str, Any] | None, out_range: tuple[float, float] = (-1.0, 1.0)) -> SegmentationAugment:
    """Build from a config value: ``None`` / ``"none"`` / ``"light"`` / ``"original"``, or a mapping
    ``{strength, block_p: {block: p}, params: {field: value}, image_fill, out_range}``.

    Also available as ``SegmentationAugment.from_config``. Bad values raise ``ConfigError``.
    """
    if spec is None:
        return SegmentationAugment("none", out_range)
    if isinstance(spec, str):
        return SegmentationAugment(spec, out_range)
    if not isinstance(spec, dict):
        raise ConfigError(f"augment: expected a preset name or a mapping, got {type(spec).__name__}")
    allowed = {"strength", "block_p", "params", "image_fill", "out_range"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"augment: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")
    return SegmentationAugment(
        spec.get("strength", "original"),
        spec.get("out_range", out_range),
        block_p=spec.get("block_p"),
        params=spec.get("params"),
        image_fill=spec.get("image_fill", "min"),
    )


SegmentationAugment.from_config = staticmethod(from_config)  # type: ignore[attr-defined]
