"""Building blocks of the replay GAN (StyleGAN2-style, docs/method.md#replay-gan).

Everything is plain PyTorch (no custom CUDA ops) and twice differentiable, so R1 and the
path-length penalty can back-propagate through it. Conventions:

* **Equalised learning rate**: weights are stored ~N(0, 1) (divided by the layer's LR
  multiplier) and scaled at run time by ``lr_multiplier / sqrt(fan_in)``.
* **Activations**: ``"lrelu"`` is leaky ReLU (slope 0.2) times √2, ``"relu"`` ReLU times √2,
  ``"linear"`` the identity; an extra ``gain`` multiplies the result, then an optional
  ``clamp`` bounds it to ±clamp·gain (the original's ``conv_clamp``).
* **Resampling** uses the separable FIR filter [1, 3, 3, 1] (normalised to unit DC gain):
  ``upsample2d`` doubles H and W, ``downsample2d`` halves them.
* Tensors are [N, C, H, W]. Weights are cast to the activation dtype at use, so the layers run
  in fp32 and under ``torch.autocast``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from relaylearn.models.gan.random import randn

LRELU_SLOPE = 0.2
ACTIVATION_GAINS = {"linear": 1.0, "relu": math.sqrt(2.0), "lrelu": math.sqrt(2.0)}
RESAMPLE_TAPS = (1.0, 3.0, 3.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Bias + activation


#: elements of 16 bits in one 64-byte (AVX-512) vector
_HALF_PER_VECTOR = 32


def broadcast_for_add(y: Tensor, x: Tensor) -> Tensor:
    """``y`` (broadcastable to ``x`` [N,C,H,W]) ready to be added to ``x``: expanded to ``x``'s
    shape and channels-last layout where ``x`` is a 16-bit channels-last CPU tensor whose C is not
    a multiple of 32, else ``y`` itself.

    PyTorch's CPU kernel adds such a tensor and a broadcast operand (a bias [1,C,1,1], a noise map
    [N,1,H,W]) in a scalar loop: at C = 16 (the GANs' 32-px layers) 250–280 µs against 60–85 µs
    for the copy and an add of equal layouts (bf16, AVX-512, one thread). The sum is the same bit
    for bit, and so are the gradients (both sum over the broadcast dimensions)."""
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.ndim == 4
        and x.shape[1] % _HALF_PER_VECTOR != 0
        and y.shape != x.shape
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    ):
        return y.expand_as(x).contiguous(memory_format=torch.channels_last)
    return y


def bias_act(x: Tensor, bias: Tensor | None = None, activation: str = "linear", gain: float = 1.0, clamp: float | None = None) -> Tensor:
    """``clamp(act(x + bias) · act_gain · gain)``; ``bias`` [C] is added along dim 1."""
    if bias is not None:
        shape = [1, -1] + [1] * (x.ndim - 2)
        x = x + broadcast_for_add(bias.reshape(shape), x)
    if activation == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    elif activation == "relu":
        x = F.relu(x)
    elif activation != "linear":
        raise ValueError(f"unknown activation '{activation}' (known: {', '.join(ACTIVATION_GAINS)})")
    total_gain = ACTIVATION_GAINS[activation] * gain
    if total_gain != 1.0:
        x = x * total_gain
    if clamp is not None:  # = x.clamp(±clamp·gain) with one backward kernel instead of clamp's four
        x = F.hardtanh(x, -clamp * gain, clamp * gain)
    return x


# ----------------------------------------------------------------------------------------------
# FIR resampling


def make_resample_kernel(taps: tuple[float, ...] = RESAMPLE_TAPS) -> Tensor:
    """2-D separable FIR kernel [k, k] from 1-D ``taps``, normalised to sum 1."""
    f = torch.tensor(taps, dtype=torch.float32)
    kernel = torch.outer(f, f)
    return kernel / kernel.sum()


class _DepthwiseCorrelation(torch.autograd.Function):
    """``conv2d(x, weight, padding, groups=C)`` for a constant ``weight`` [C, 1, kh, kw], or with
    ``transposed`` its adjoint ``conv_transpose2d``. Each is the other's gradient, so every order
    of derivative is again one depthwise convolution (autograd's own double backward of a grouped
    convolution runs one convolution per group: thousands of kernel launches under R1 and the
    path-length penalty)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, padding: tuple[int, int], transposed: bool) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.padding, ctx.transposed = padding, transposed
        op = F.conv_transpose2d if transposed else F.conv2d
        return op(x, weight.to(x.dtype), padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        return _DepthwiseCorrelation.apply(grad, weight, ctx.padding, not ctx.transposed), None, None, None


def depthwise_correlate(x: Tensor, weight: Tensor, padding: tuple[int, int] = (0, 0)) -> Tensor:
    """Per-channel correlation of ``x`` [N, C, H, W] with a constant ``weight`` [C, 1, kh, kw],
    zero-padded by ``padding`` = (ph, pw) rows/columns on each side (0 ≤ p < k) →
    [N, C, H + 2·ph − kh + 1, W + 2·pw − kw + 1]; ``weight`` gets no gradient (it must not require one).

    Same result as ``F.conv2d(x, weight, padding=padding, groups=C)``, but differentiable to any
    order at the cost of one depthwise convolution per order (R1 and the path-length penalty need two)."""
    if weight.requires_grad:
        raise ValueError("depthwise_correlate: weight must be a constant (it requires grad)")
    if weight.ndim != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"depthwise_correlate: weight must be [{x.shape[1]}, 1, kh, kw], got {tuple(weight.shape)}")
    padding = (int(padding[0]), int(padding[1]))
    if not all(0 <= p < k for p, k in zip(padding, weight.shape[-2:])):
        raise ValueError(f"depthwise_correlate: padding must be in [0, k) for a {tuple(weight.shape[-2:])} kernel, got {padding}")
    return _DepthwiseCorrelation.apply(x, weight, padding, False)


def fir_filter2d(x: Tensor, kernel: Tensor, padding: tuple[int, int, int, int], gain: float = 1.0) -> Tensor:
    """Depthwise 2-D FIR filtering of ``x`` [N, C, H, W] with ``kernel`` [k, k].

    ``padding`` is (left, right, top, bottom) zero padding; symmetric padding below k is done
    by the convolution itself (no padded copy). ``kernel`` must be symmetric (correlation and
    convolution coincide).
    """
    channels = x.shape[1]
    weight = (kernel * gain).to(x.dtype)[None, None].expand(channels, 1, -1, -1)
    left, right, top, bottom = padding
    if left == right < kernel.shape[-1] and top == bottom < kernel.shape[-2]:
        return depthwise_correlate(x, weight, (top, left))
    return depthwise_correlate(F.pad(x, padding), weight)


def upsample2d(x: Tensor, kernel: Tensor) -> Tensor:
    """2× FIR upsampling: zero insertion then filtering (gain 4 keeps the DC level). [N,C,2H,2W]."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h, 1, w, 1)
    x = F.pad(x, (0, 1, 0, 0, 0, 1))  # zeros after every sample along H and W
    x = x.reshape(n, c, 2 * h, 2 * w)
    k = kernel.shape[-1]
    pad0, pad1 = (k + 1) // 2, (k - 2) // 2  # (2, 1) for 4 taps: centred output grid
    return fir_filter2d(x, kernel, (pad0, pad1, pad0, pad1), gain=4.0)


def downsample2d(x: Tensor, kernel: Tensor) -> Tensor:
    """2× FIR downsampling: filtering then dropping every second row/column. [N,C,H/2,W/2]."""
    pad = (kernel.shape[-1] - 1) // 2  # 1 for 4 taps
    x = fir_filter2d(x, kernel, (pad, pad, pad, pad))
    return x[:, :, ::2, ::2]


def conv2d_resample(x: Tensor, weight: Tensor, kernel: Tensor, up: bool = False, down: bool = False) -> Tensor:
    """'Same' convolution of ``x`` with ``weight`` [O, I, k, k], optionally with 2× resampling.

    ``up``: transposed stride-2 convolution followed by the FIR filter (equals FIR upsampling
    followed by the convolution on an unbounded image). ``down``: FIR filter followed by a
    stride-2 convolution. ``weight`` is used as given (gains already applied).
    """
    weight = weight.to(x.dtype)
    k = weight.shape[-1]
    if up and down:
        raise ValueError("conv2d_resample: up and down are exclusive")
    if up:
        transposed = weight.transpose(0, 1).flip([2, 3])  # conv_transpose2d convolves, conv2d correlates
        x = F.conv_transpose2d(x, transposed, stride=2)  # [N, O, 2H + k - 2, ...]
        pad = (kernel.shape[-1] - k) // 2 + 1  # output cropped back to 2H × 2W, centred
        return fir_filter2d(x, kernel, (pad, pad, pad, pad), gain=4.0)
    if down:
        pad = (k + kernel.shape[-1] - 2) // 2  # (k+1)//2 for 4 taps
        x = fir_filter2d(x, kernel, (pad, pad, pad, pad))
        return F.conv2d(x, weight, stride=2)
    return F.conv2d(x, weight, padding=k // 2)


# ----------------------------------------------------------------------------------------------
# Equalised-LR layers


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalised LR: [..., in_features] → [..., out_features].

    ``bias_init`` is the effective initial bias; ``lr_multiplier`` scales the effective
    learning rate of both weight and bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0, lr_multiplier: float = 1.0, activation: str = "linear"):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init) / lr_multiplier)) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        # the gains ride along as addmm's alpha/beta: one kernel instead of three (launches are
        # what a GPU iteration of the replay GAN waits for, benchmarks/README.md)
        flat, weight = x.reshape(-1, self.in_features), self.weight.to(x.dtype)
        if self.bias is None:
            y = torch.mm(flat, weight.t()) * self.weight_gain
        else:
            y = torch.addmm(self.bias.to(x.dtype), flat, weight.t(), beta=self.bias_gain, alpha=self.weight_gain)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.activation == "linear" else bias_act(y, None, self.activation)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation={self.activation}"


class EqualizedConv2d(nn.Module):
    """Equalised-LR 'same' convolution [N, I, H, W] → [N, O, H', W'] with bias + activation.

    ``down=True`` halves the resolution (FIR filter, then stride 2). ``conv_clamp`` bounds the
    activations (see module docstring). ``forward(x, gain)`` multiplies the output by ``gain``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        down: bool = False,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.activation, self.down, self.conv_clamp = activation, down, conv_clamp
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        if down:
            self.register_buffer("resample_kernel", make_resample_kernel(), persistent=False)

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        weight = self.weight * self.weight_gain
        kernel = self.resample_kernel if self.down else None
        x = conv2d_resample(x, weight, kernel, down=self.down)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bias_act(x, bias, self.activation, gain=gain, clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}→{o}, kernel={k}, activation={self.activation}, down={self.down}"


# ----------------------------------------------------------------------------------------------
# Style-modulated convolution


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, up: bool = False, kernel: Tensor | None = None) -> Tensor:
    """Convolution with per-sample input-channel scaling ``styles`` [N, I] (StyleGAN2).

    ``weight`` [O, I, k, k] already carries its gain. With ``demodulate`` every output channel
    of every sample is rescaled to unit expected second moment: ``rsqrt(Σ_{i,k}(w·s)² + 1e-8)``.
    Implemented by scaling activations (mathematically identical to per-sample weights, but a
    single shared convolution for the whole batch).
    """
    x = x * styles.reshape(styles.shape[0], -1, 1, 1)
    x = conv2d_resample(x, weight, kernel, up=up)
    if demodulate:
        weight_energy = weight.float().square().sum(dim=[2, 3])  # [O, I]
        dcoefs = (styles.float().square() @ weight_energy.t() + 1e-8).rsqrt()  # [N, O]
        x = x * dcoefs.reshape(dcoefs.shape[0], -1, 1, 1)
    return x


class NoiseInput(nn.Module):
    """Per-pixel noise [N, 1, H, W] with a learned scalar strength (init 0), added to features.

    ``mode``: ``"random"`` fresh N(0, 1) noise, ``"const"`` a fixed buffer, ``"none"`` nothing.
    """

    MODES = ("random", "const", "none")

    def __init__(self, resolution: int):
        super().__init__()
        self.strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("const_noise", torch.randn(resolution, resolution))

    def forward(self, x: Tensor, mode: str = "random") -> Tensor:
        if mode == "random":
            noise = randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
        elif mode == "const":
            noise = self.const_noise.to(x.dtype)
        elif mode == "none":
            return x
        else:
            raise ValueError(f"unknown noise mode '{mode}' (known: {', '.join(self.MODES)})")
        return x + broadcast_for_add(noise * self.strength.to(x.dtype), x)


class StyledConv2d(nn.Module):
    """Synthesis layer: modulated 3×3 conv (optionally 2× up), noise, bias, lrelu.

    forward(x [N, I, H, W], w [N, w_dim]) → [N, O, H', W'] (H' = 2H with ``up``).
    """

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False, kernel_size: int = 3, conv_clamp: float | None = None
    ):
        super().__init__()
        self.up, self.conv_clamp = up, conv_clamp
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.noise = NoiseInput(resolution)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        if up:
            self.register_buffer("resample_kernel", make_resample_kernel(), persistent=False)

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random") -> Tensor:
        styles = self.affine(w)
        kernel = self.resample_kernel if self.up else None
        x = modulated_conv2d(x, self.weight * self.weight_gain, styles, demodulate=True, up=self.up, kernel=kernel)
        x = self.noise(x, noise_mode)
        return bias_act(x, self.bias.to(x.dtype), "lrelu", clamp=self.conv_clamp)


class ToRGB(nn.Module):
    """Modulated 1×1 conv without demodulation, plus bias: [N, I, H, W] → [N, img_channels, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = EqualizedLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias.to(x.dtype), "linear", clamp=self.conv_clamp)


# ----------------------------------------------------------------------------------------------
# Discriminator helpers


class MinibatchStdDev(nn.Module):
    """Appends ``num_channels`` feature maps holding the per-group standard deviation.

    Samples are split into groups of ``group_size`` (sample n belongs to group n mod N/G); if
    the batch size is not divisible by ``group_size`` the whole batch is one group.
    [N, C, H, W] → [N, C + num_channels, H, W]. Computed in fp32. ``chunks``: x holds that many
    equal, independent batches one after another, each grouped on its own (as separate calls).
    """

    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: Tensor, chunks: int = 1) -> Tensor:
        if chunks > 1:
            return torch.cat([self(part) for part in x.chunk(chunks)])
        n, c, h, w = x.shape
        group = self.group_size if n % self.group_size == 0 else n
        f = self.num_channels
        y = x.float().reshape(group, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over the group
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # [N/G, F]
        y = y.reshape(-1, f, 1, 1).repeat(group, 1, h, w)
        return torch.cat([x, y.to(x.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
