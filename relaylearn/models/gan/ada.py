"""Adaptive discriminator augmentation (ADA, Karras et al. 2020; docs/method.md#ada).

``AdaptiveAugment(spec, num_channels)`` augments every input of a discriminator. Each op is
applied per sample with probability ``p`` (a buffer, adjusted by ``AdaController``). Spec
letters (the ADA presets):

* ``b`` — x-flip, 90° rotations, integer translation (±12.5 % of the size).
* ``g`` — isotropic scale (log2 std 0.2), arbitrary rotation (uniform angle, applied before and
  after the anisotropic scale with probability 1 − √(1 − p) each), anisotropic scale (log2 std
  0.2), fractional translation (std 12.5 % of the size).
* ``c`` — brightness (+N(0, 0.2)), contrast (×2^N(0, 0.5)), luma flip, hue rotation (uniform
  angle about the luma axis), saturation (×2^N(0, 1) off the luma axis), composed into one
  affine colour transform per sample. Channels 0–2 (RGB) get the full 3×3 transform; every
  other channel (the label map of a 4-channel D input, or all channels of a 1/2-channel input)
  gets the scalar affine formed by the row-average of that matrix (brightness shifts it,
  contrast scales it, luma flip negates it, hue and saturation leave it unchanged). The
  original skips hue and saturation altogether for non-3-channel inputs; here they still apply
  to the RGB part of a 4-channel input unless ``faithful_hue_saturation=True``.
* ``f`` — image-space filtering: four frequency bands (cut-offs at 1/16, 1/8, 1/4 cycles/px) with
  per-sample gains 2^N(0, 1), renormalised for an expected power spectrum weighting
  [10, 1, 1, 1]/13 as in ADA. The bands are Hann-windowed-sinc FIR filters (31 taps) that sum
  exactly to the identity, applied separably with reflect padding (replicate padding for
  images of 15 px or less) — a simpler filter bank than ADA's wavelet-based one.
* ``n`` — additive Gaussian noise with per-sample std |N(0, 0.1)|.

All geometric ops are composed into one affine map per sample and applied with a pure-PyTorch
bilinear sampler (gathers, reflected coordinates = reflect padding), which, unlike
``grid_sample``, supports double backward (R1 through the pipe). ADA's 2× supersampling around
the resampling step is not done. Everything is batch-vectorised; no host synchronisation.
The augmentation runs in fp32 (fp64 for fp64 input; autocast disabled) and returns the input
dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relaylearn.errors import ConfigError
from relaylearn.models.gan.layers import depthwise_correlate
from relaylearn.models.gan.random import rand, randint, randn, randn_like

SPEC_LETTERS = "bgcfn"
FILTER_TAPS = 31
FILTER_CUTOFFS = (1 / 16, 1 / 8, 1 / 4)  # cycles per pixel (Nyquist = 1/2)
FILTER_EXPECTED_POWER = (10.0, 1.0, 1.0, 1.0)

# Strengths of the ADA presets.
XINT_MAX = 0.125
SCALE_STD = 0.2
ANISO_STD = 0.2
XFRAC_STD = 0.125
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5
SATURATION_STD = 1.0
FILTER_STD = 1.0
NOISE_STD = 0.1


def parse_spec(spec: str) -> frozenset[str]:
    """Validates an augmentation spec such as ``"bgcfn"``; raises ``ConfigError`` otherwise."""
    unknown = sorted(set(spec) - set(SPEC_LETTERS))
    if unknown:
        raise ConfigError(f"ADA spec '{spec}': unknown letter '{unknown[0]}' (allowed: {', '.join(SPEC_LETTERS)})")
    return frozenset(spec)


def _lowpass_taps(cutoff: float, taps: int) -> Tensor:
    """Hann-windowed sinc low-pass with unit DC gain, ``taps`` (odd) coefficients, float64."""
    n = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    h = 2 * cutoff * torch.sinc(2 * cutoff * n)
    h = h * torch.hann_window(taps + 2, periodic=False, dtype=torch.float64)[1:-1]
    return h / h.sum()


def _unit_impulse(taps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    delta = torch.zeros(taps, dtype=dtype)
    delta[taps // 2] = 1
    return delta


def _cross_product_matrix(axis: tuple[float, float, float]) -> Tensor:
    """[3, 3] matrix K with K @ v = axis × v (from numbers, not a tensor: the networks also build
    on the meta device, to measure them before they are allocated)."""
    a0, a1, a2 = axis
    return torch.tensor([[0.0, -a2, a1], [a2, 0.0, -a0], [-a1, a0, 0.0]])


def make_filter_bank(taps: int = FILTER_TAPS, cutoffs: tuple[float, ...] = FILTER_CUTOFFS) -> Tensor:
    """Band-pass filters [len(cutoffs) + 1, taps], low to high, summing exactly to a unit impulse."""
    delta = _unit_impulse(taps, torch.float64)
    lowpasses = [torch.zeros(taps, dtype=torch.float64)] + [_lowpass_taps(f, taps) for f in cutoffs] + [delta]
    return torch.stack([hi - lo for lo, hi in zip(lowpasses[:-1], lowpasses[1:])]).float()


# ----------------------------------------------------------------------------------------------
# Batched 3×3 homogeneous matrices (rows: x, y, 1).


def _matrix(rows: list[list[Tensor | float]], like: Tensor) -> Tensor:
    """Stacks per-sample entries (tensors [N] or scalars) into [N, len(rows), len(rows[0])]."""

    def entry(v: Tensor | float) -> Tensor:
        return v if isinstance(v, Tensor) else torch.full_like(like, float(v))

    return torch.stack([torch.stack([entry(v) for v in row], dim=-1) for row in rows], dim=-2)


def _translate(tx: Tensor, ty: Tensor) -> Tensor:
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def _scale(sx: Tensor, sy: Tensor) -> Tensor:
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def _rotate(cos: Tensor, sin: Tensor) -> Tensor:
    return _matrix([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], cos)


# ----------------------------------------------------------------------------------------------
# Bilinear sampling with reflection


def _reflect(coord: Tensor, size: int) -> Tensor:
    """Folds pixel coordinates into [0, size − 1] by mirror reflection (edge not repeated)."""
    if size == 1:
        return torch.zeros_like(coord)
    period = 2 * (size - 1)
    coord = torch.remainder(coord, period)
    return torch.where(coord > size - 1, period - coord, coord)


def bilinear_sample(x: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Samples ``x`` [N, C, H, W] at pixel coordinates u (column), v (row) [N, P] → [N, C, P].

    Out-of-range coordinates are reflected, equivalent to reflect padding. Built from
    ``gather``, so it is differentiable any number of times w.r.t. ``x`` (not w.r.t. u, v).
    """
    n, c, h, w = x.shape
    u, v = _reflect(u, w), _reflect(v, h)
    u0, v0 = u.floor(), v.floor()
    fu, fv = (u - u0).unsqueeze(1), (v - v0).unsqueeze(1)
    u0, v0 = u0.long().clamp(0, w - 1), v0.long().clamp(0, h - 1)
    u1, v1 = (u0 + 1).clamp(max=w - 1), (v0 + 1).clamp(max=h - 1)
    flat = x.reshape(n, c, h * w)

    def tap(row: Tensor, col: Tensor) -> Tensor:
        index = (row * w + col).unsqueeze(1).expand(-1, c, -1)
        return flat.gather(2, index)

    top = tap(v0, u0) * (1 - fu) + tap(v0, u1) * fu
    bottom = tap(v1, u0) * (1 - fu) + tap(v1, u1) * fu
    return top * (1 - fv) + bottom * fv


# ----------------------------------------------------------------------------------------------


class AdaptiveAugment(nn.Module):
    """Differentiable ADA pipeline: x [N, num_channels, H, W] → augmented x (same shape/dtype).

    ``p`` (buffer, scalar) is the per-op probability; with p = 0 the output equals the input.
    """

    def __init__(self, spec: str = "bgcfn", num_channels: int = 3, p: float = 0.0, faithful_hue_saturation: bool = False):
        super().__init__()
        self.spec = spec
        self.ops = parse_spec(spec)
        self.num_channels = num_channels
        self.faithful_hue_saturation = faithful_hue_saturation
        self.register_buffer("p", torch.tensor(float(p)))
        # Constants live in (non-saved) buffers: creating them in forward would copy host → device.
        self.register_buffer("filter_bank", make_filter_bank(), persistent=False)
        power = torch.tensor(FILTER_EXPECTED_POWER)
        self.register_buffer("filter_expected_power", power / power.sum(), persistent=False)
        self.register_buffer("filter_identity", _unit_impulse(FILTER_TAPS), persistent=False)
        self.register_buffer("quarter_turn_cos", torch.tensor([1.0, 0.0, -1.0, 0.0]), persistent=False)
        self.register_buffer("quarter_turn_sin", torch.tensor([0.0, 1.0, 0.0, -1.0]), persistent=False)
        luma = torch.full((3,), 1 / math.sqrt(3))
        self.register_buffer("luma_projection", torch.outer(luma, luma), persistent=False)
        self.register_buffer("luma_cross", _cross_product_matrix((1 / math.sqrt(3),) * 3), persistent=False)

    def extra_repr(self) -> str:
        return f"spec='{self.spec}', num_channels={self.num_channels}"

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"AdaptiveAugment: x must be [N, {self.num_channels}, H, W], got {tuple(x.shape)}")
        dtype = x.dtype
        compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(compute_dtype)
            p = self.p.float()
            if self.ops & {"b", "g"}:
                x = self._geometric(x, p)
            if "c" in self.ops:
                x = self._color(x, p)
            if "f" in self.ops:
                x = self._filter(x, p)
            if "n" in self.ops:
                x = self._noise(x, p)
        return x.to(dtype)

    # -- random draws ---------------------------------------------------------------------------

    @staticmethod
    def _sample_mask(p: Tensor | float, n: int, device: torch.device) -> Tensor:
        """Per-sample Bernoulli(p) mask [N] (bool)."""
        return rand(n, device=device) < p

    # -- geometry ---------------------------------------------------------------------------------

    def _geometric(self, x: Tensor, p: Tensor) -> Tensor:
        n, _, h, w = x.shape
        dev = x.device
        ones = torch.ones(n, device=dev)
        # Inverse transform: output pixel (centred coordinates) → input pixel.
        g_inv = torch.eye(3, device=dev).expand(n, 3, 3)

        if "b" in self.ops:
            flip = torch.where(self._sample_mask(p, n, dev), randint(0, 2, (n,), device=dev), 0)
            g_inv = g_inv @ _scale(1 - 2 * flip.float(), ones)
            quarter_turns = torch.where(self._sample_mask(p, n, dev), randint(0, 4, (n,), device=dev), 0)
            g_inv = g_inv @ _rotate(self.quarter_turn_cos.float()[quarter_turns], self.quarter_turn_sin.float()[quarter_turns])
            shift = (rand(n, 2, device=dev) * 2 - 1) * XINT_MAX
            shift = torch.where(self._sample_mask(p, n, dev)[:, None], shift, 0)
            g_inv = g_inv @ _translate((shift[:, 0] * w).round(), (shift[:, 1] * h).round())

        if "g" in self.ops:
            iso = torch.where(self._sample_mask(p, n, dev), torch.exp2(randn(n, device=dev) * SCALE_STD), 1)
            g_inv = g_inv @ _scale(1 / iso, 1 / iso)
            p_rot = 1 - torch.sqrt((1 - p).clamp(min=0))  # two rotation chances, total probability p
            g_inv = g_inv @ self._random_rotation(p_rot, n, dev)
            aniso = torch.where(self._sample_mask(p, n, dev), torch.exp2(randn(n, device=dev) * ANISO_STD), 1)
            g_inv = g_inv @ _scale(1 / aniso, aniso)
            g_inv = g_inv @ self._random_rotation(p_rot, n, dev)
            frac = torch.where(self._sample_mask(p, n, dev)[:, None], randn(n, 2, device=dev) * XFRAC_STD, 0)
            g_inv = g_inv @ _translate(-frac[:, 0] * w, -frac[:, 1] * h)

        cols = torch.arange(w, device=dev, dtype=torch.float32) - (w - 1) / 2
        rows = torch.arange(h, device=dev, dtype=torch.float32) - (h - 1) / 2
        grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
        grid = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1), torch.ones(h * w, device=dev)])  # [3, P]
        source = (g_inv @ grid).to(x.dtype)  # [N, 3, P]
        u = source[:, 0] + (w - 1) / 2
        v = source[:, 1] + (h - 1) / 2
        return bilinear_sample(x, u, v).reshape(x.shape)

    def _random_rotation(self, p: Tensor, n: int, dev: torch.device) -> Tensor:
        angle = torch.where(self._sample_mask(p, n, dev), (rand(n, device=dev) * 2 - 1) * math.pi, 0)
        return _rotate(torch.cos(angle), torch.sin(-angle))

    # -- colour ---------------------------------------------------------------------------------

    def _color(self, x: Tensor, p: Tensor) -> Tensor:
        n, c = x.shape[:2]
        dev = x.device
        eye = torch.eye(3, device=dev)
        luma_proj = self.luma_projection.float()
        matrix = eye.expand(n, 3, 3)
        offset = torch.zeros(n, 3, device=dev)

        brightness = torch.where(self._sample_mask(p, n, dev), randn(n, device=dev) * BRIGHTNESS_STD, 0)
        offset = offset + brightness[:, None]
        contrast = torch.where(self._sample_mask(p, n, dev), torch.exp2(randn(n, device=dev) * CONTRAST_STD), 1)
        matrix, offset = matrix * contrast[:, None, None], offset * contrast[:, None]
        flip = torch.where(self._sample_mask(p, n, dev), randint(0, 2, (n,), device=dev), 0).float()
        matrix, offset = self._compose(eye - 2 * luma_proj * flip[:, None, None], matrix, offset)

        if c >= 3 and not (self.faithful_hue_saturation and c != 3):
            angle = torch.where(self._sample_mask(p, n, dev), (rand(n, device=dev) * 2 - 1) * math.pi, 0)
            matrix, offset = self._compose(self._luma_rotation(angle), matrix, offset)
            sat = torch.where(self._sample_mask(p, n, dev), torch.exp2(randn(n, device=dev) * SATURATION_STD), 1)
            matrix, offset = self._compose(luma_proj + (eye - luma_proj) * sat[:, None, None], matrix, offset)

        matrix, offset = matrix.to(x.dtype), offset.to(x.dtype)
        parts = []
        if c >= 3:
            parts.append(torch.einsum("nij,njhw->nihw", matrix, x[:, :3]) + offset[:, :, None, None])
        extra = x[:, 3:] if c >= 3 else x
        if extra.shape[1] > 0:
            scale = matrix.mean(dim=1).sum(dim=1)  # row-average of the matrix applied to a grey value
            shift = offset.mean(dim=1)
            parts.append(extra * scale[:, None, None, None] + shift[:, None, None, None])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @staticmethod
    def _compose(linear: Tensor, matrix: Tensor, offset: Tensor) -> tuple[Tensor, Tensor]:
        """Applies ``linear`` [N, 3, 3] after the affine map (matrix, offset)."""
        return linear @ matrix, (linear @ offset.unsqueeze(-1)).squeeze(-1)

    def _luma_rotation(self, angle: Tensor) -> Tensor:
        """Rotations [N, 3, 3] by ``angle`` about the luma axis (Rodrigues' formula)."""
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        eye = torch.eye(3, device=angle.device)
        return cos * eye + sin * self.luma_cross.float() + (1 - cos) * self.luma_projection.float()

    # -- filtering ------------------------------------------------------------------------------

    def _filter(self, x: Tensor, p: Tensor) -> Tensor:
        n, c, h, w = x.shape
        dev = x.device
        bands = self.filter_bank.shape[0]
        gains = torch.ones(n, bands, device=dev)
        for band in range(bands):
            t = torch.ones(n, bands, device=dev)
            t[:, band] = torch.exp2(randn(n, device=dev) * FILTER_STD)
            t = t / (self.filter_expected_power.float() * t.square()).sum(dim=1, keepdim=True).sqrt()
            gains = gains * torch.where(self._sample_mask(p, n, dev)[:, None], t, 1)
        # Identity + Σ (g − 1)·band: exactly the identity when every gain is 1.
        taps = self.filter_bank.shape[1]
        kernels = self.filter_identity.float() + (gains - 1) @ self.filter_bank.float()  # [N, taps]
        weight = kernels.repeat_interleave(c, dim=0).to(x.dtype)  # [N·C, taps]
        pad = taps // 2
        mode = "reflect" if min(h, w) > pad else "replicate"
        y = x.reshape(1, n * c, h, w)
        y = depthwise_correlate(F.pad(y, (pad, pad, 0, 0), mode=mode), weight[:, None, None, :])
        y = depthwise_correlate(F.pad(y, (0, 0, pad, pad), mode=mode), weight[:, None, :, None])
        return y.reshape(n, c, h, w)

    # -- noise ----------------------------------------------------------------------------------

    def _noise(self, x: Tensor, p: Tensor) -> Tensor:
        n = x.shape[0]
        sigma = torch.where(self._sample_mask(p, n, x.device), randn(n, device=x.device).abs() * NOISE_STD, 0)
        return x + randn_like(x) * sigma[:, None, None, None].to(x.dtype)


# ----------------------------------------------------------------------------------------------


class AdaController(nn.Module):
    """Adjusts an ``AdaptiveAugment``'s p from the sign of D's outputs on reals (ADA heuristic).

    Call ``accumulate(real_logits)`` after every D step and ``update(pipe)`` every ``interval``
    batches (``is_update_batch(batch_index)`` tells when). ``update`` moves p by
    ``sign(mean − target) · batch_size · world_size · interval / (kimg · 1000)``, clipped to
    [0, 1], where mean is the average of the accumulated per-step ``mean(sign(real_logits))``;
    then the accumulator is reset. State (buffers ``sign_sum``, ``num_steps``) is tensors, so it
    can be saved and all-reduced; nothing synchronises with the host.
    """

    def __init__(self, target: float = 0.6, interval: int = 4, kimg: float = 500, batch_size: int = 128, world_size: int = 1):
        super().__init__()
        if interval < 1 or kimg <= 0 or batch_size < 1 or world_size < 1:
            raise ValueError("AdaController: interval, kimg, batch_size and world_size must be positive")
        self.target, self.interval, self.kimg = target, interval, kimg
        self.batch_size, self.world_size = batch_size, world_size
        self.register_buffer("sign_sum", torch.zeros([]))
        self.register_buffer("num_steps", torch.zeros([]))

    @property
    def step_size(self) -> float:
        """The change of p per adjustment."""
        return self.batch_size * self.world_size * self.interval / (self.kimg * 1000)

    def is_update_batch(self, batch_index: int) -> bool:
        """True after every ``interval``-th batch (``batch_index`` 0-based)."""
        return (batch_index + 1) % self.interval == 0

    @torch.no_grad()
    def accumulate(self, real_logits: Tensor) -> None:
        """Adds ``mean(sign(real_logits))`` of one D step."""
        self.sign_sum.add_(torch.sign(real_logits.detach().float()).mean().to(self.sign_sum.device))
        self.num_steps.add_(1)

    @torch.no_grad()
    def update(self, pipe: AdaptiveAugment, all_reduce_mean: Callable[[Tensor], Tensor] = lambda t: t) -> None:
        """Adjusts ``pipe.p`` once from the accumulated statistics (no-op if nothing accumulated)."""
        stats = all_reduce_mean(torch.stack([self.sign_sum, self.num_steps]))
        mean = stats[0] / stats[1].clamp(min=1)
        adjust = torch.sign(mean - self.target) * self.step_size
        adjust = torch.where(stats[1] > 0, adjust, torch.zeros_like(adjust))
        pipe.p.copy_((pipe.p + adjust.to(pipe.p.device)).clamp(0, 1))
        self.sign_sum.zero_()
        self.num_steps.zero_()
