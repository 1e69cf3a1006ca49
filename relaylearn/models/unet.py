"""The solver: a U-Net whose encoder is a ResNet-18 (docs/method.md#solver).

Layout for an input of C channels and size H×W (H, W divisible by 32)::

    encoder (torchvision ResNet-18 names, no fc)      skips
      conv1 7×7/2, bn1, relu          -> 64  @ H/2     s1
      maxpool 3×3/2                   -> 64  @ H/4     s2 (taken before layer1)
      layer1, layer2                  -> 128 @ H/8     s3 (layer1's output is not a skip)
      layer3                          -> 256 @ H/16    s4
      layer4                          -> 512 @ H/32    s5
    decoder: five Up stages (2× upsample, concat skip, 2 × [3×3 conv, BN, LeakyReLU 0.01])
      (512 + s4 256 -> 256) @ H/16, (256 + s3 128 -> 128) @ H/8, (128 + s2 64 -> 64) @ H/4,
      (64 + s1 64 -> 64) @ H/2, (64 + input C -> 64) @ H
    head: 1×1 conv -> num_classes logits @ H

Parameter counts with C = 3, 3 classes, transposed-conv upsampling: encoder 11,176,512,
decoder (Up stages + head) 4,696,323.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from relaylearn.errors import ConfigError

ENCODER_STRIDE = 32


class CentreTapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that, on a 1×1 input with "same" zero padding, applies the kernel's centre tap
    only: ``[B,Cin,1,1] -> [B,Cout,1,1]``, the same result, as every other tap meets padding zeros
    (their gradients are zero either way). At 32 px the encoder's last stage runs on 1×1 maps, where
    this skips 8/9 of its three 512×512 3×3 convolutions, forward and backward; without groups the
    centre tap is a matrix product (``F.linear``), and it is taken from the flattened kernel in
    one indexing step, so the backward pass scatters into one zero-filled weight gradient.
    Any other input goes through ``nn.Conv2d`` unchanged; parameter names and shapes are its own."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        same_padding = isinstance(self.padding, tuple) and all(k % 2 == 1 and p == k // 2 for k, p in zip(self.kernel_size, self.padding))
        if input.shape[-2:] == (1, 1) and same_padding and self.dilation == (1, 1) and self.padding_mode == "zeros":
            ph, pw = self.padding
            centre = weight.flatten(2)[:, :, ph * self.kernel_size[1] + pw]  # [Cout, Cin/groups]
            if self.groups == 1:
                return F.linear(input.flatten(1), centre, bias)[:, :, None, None]
            return F.conv2d(input, centre[:, :, None, None], bias, groups=self.groups)
        return super()._conv_forward(input, weight, bias)


class PatchConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` that, when its kernel equals its stride (the decoder's 2×2, stride 2:
    every input pixel becomes its own output patch), runs on the CPU as one matrix product
    ``[N·H·W, Cin] @ [Cin, kh·kw·Cout]`` and one reorder into a channels-last
    ``[N, Cout, kh·H, kw·W]`` output: the same values up to rounding; a sequential solver step at
    the demo size (bf16, AVX-512, two threads) is 1.05–1.09× faster, as oneDNN's transposed
    convolution is slower than the product it amounts to and the decoder behind it then runs in
    channels-last. Other settings, other devices: ``nn.ConvTranspose2d`` unchanged. Parameter names
    and shapes are its own.

    The product's columns are ordered (kh, kw, Cout) when the weight is smaller than the output
    (Cin < N·H·W), so that the reorder and its backward move whole rows of Cout channels, for a
    reordered copy of the weight per call; otherwise (Cout, kh, kw), the weight's own order, and
    the reorder moves single values. At 32 px and batch 16 the decoder's last three stages take the
    first form (forward and backward of the three together 2.6× faster on one CPU thread in bf16;
    the same forward values), its first two, with 512² and 256² × 4 weights on 1×1 and 2×2 maps,
    the second."""

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        non_overlapping = self.kernel_size == self.stride and self.padding == (0, 0) and self.output_padding == (0, 0) and self.dilation == (1, 1)
        if not (non_overlapping and self.groups == 1 and output_size is None and input.device.type == "cpu" and input.ndim == 4):
            return super().forward(input, output_size)
        n, c, h, w = input.shape
        kh, kw = self.kernel_size
        out_channels = self.weight.shape[1]
        rows = input.permute(0, 2, 3, 1).reshape(n * h * w, c)  # [NHW, Cin]
        if c < n * h * w:  # the weight [Cin, Cout·kh·kw] is smaller than the output [NHW, Cout·kh·kw]
            weight = self.weight.permute(0, 2, 3, 1).reshape(c, -1)  # [Cin, (kh, kw, Cout)]
            bias = None if self.bias is None else self.bias.repeat(kh * kw)
            patches = F.linear(rows, weight.t(), bias).reshape(n, h, w, kh, kw, out_channels).permute(0, 1, 3, 2, 4, 5)
        else:
            bias = None if self.bias is None else self.bias.repeat_interleave(kh * kw)
            patches = F.linear(rows, self.weight.reshape(c, -1).t(), bias)  # [NHW, (Cout, kh, kw)]
            patches = patches.reshape(n, h, w, out_channels, kh, kw).permute(0, 1, 4, 2, 5, 3)  # [N, H, kh, W, kw, Cout]
        return patches.reshape(n, h * kh, w * kw, out_channels).permute(0, 3, 1, 2)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with a residual; torchvision parameter names."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = CentreTapConv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = CentreTapConv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _resnet_layer(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels))


class ResNet18Encoder(nn.Module):
    """ResNet-18 without avgpool/fc; ``state_dict`` keys match torchvision's ``resnet18``.

    ``forward(x [B,C,H,W])`` returns the skips ``[s1, s2, s3, s4, s5]`` with 64, 64, 128, 256,
    512 channels at H/2, H/4, H/8, H/16, H/32.
    """

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _resnet_layer(64, 64, 1)
        self.layer2 = _resnet_layer(64, 128, 2)
        self.layer3 = _resnet_layer(128, 256, 2)
        self.layer4 = _resnet_layer(256, 512, 2)

    def forward(self, x: Tensor) -> list[Tensor]:
        s1 = self.relu(self.bn1(self.conv1(x)))
        s2 = self.maxpool(s1)
        s3 = self.layer2(self.layer1(s2))
        s4 = self.layer3(s3)
        s5 = self.layer4(s4)
        return [s1, s2, s3, s4, s5]


class Up(nn.Module):
    """Upsample ×2 (channels kept), concatenate the skip, then two (3×3 conv, BN, LeakyReLU 0.01).

    ``forward(x [B,Cx,h,w], skip [B,Cs,2h,2w]) -> [B,out_channels,2h,2w]``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bilinear: bool = False):
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        else:
            self.up = PatchConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNetResNet18(nn.Module):
    """U-Net with a ResNet-18 encoder; ``forward(x [B,C,H,W]) -> logits [B,num_classes,H,W]``.

    H and W must be divisible by 32. ``pretrained_path``: a local torchvision-format ResNet-18
    state dict (``.safetensors`` or ``.pth``) loaded into ``self.encoder`` (see
    :func:`load_resnet18_weights`); with ``in_channels != 3`` the first conv stays random.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        bilinear: bool = False,
        pretrained_path: str | Path | None = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder = ResNet18Encoder(in_channels)
        # (channels coming up, skip channels, channels out) from the deepest stage to full size
        stages = [(512, 256, 256), (256, 128, 128), (128, 64, 64), (64, 64, 64), (64, in_channels, 64)]
        self.decoder = nn.ModuleList(Up(i, s, o, bilinear) for i, s, o in stages)
        self.head = nn.Conv2d(64, num_classes, kernel_size=1)
        if pretrained_path is not None:
            load_resnet18_weights(self.encoder, pretrained_path)

    def check_training_input(self, batch_size: int, height: int, width: int) -> None:
        """ConfigError unless training batches of ``batch_size`` images of ``height`` × ``width``
        run: both sides divisible by 32, and more than one value per channel for BatchNorm at the
        H/32 × W/32 bottleneck (a batch of one 32-px image has a single one)."""
        problem = _size_problem(height, width)
        if problem:
            raise ConfigError(f"common.dataset.kwargs.img_size: {problem}")
        cells = (height // ENCODER_STRIDE) * (width // ENCODER_STRIDE)
        if batch_size * cells < 2:
            raise ConfigError(
                f"common.train.batch_size: {batch_size} image(s) of {height}x{width} leave BatchNorm one value per channel at the U-Net's "
                f"{height // ENCODER_STRIDE}x{width // ENCODER_STRIDE} bottleneck; training needs a batch_size of at least {-(-2 // cells)} at this img_size"
            )

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            problem = _size_problem(*x.shape[-2:])
            if problem:
                raise ConfigError(problem)
        s1, s2, s3, s4, s5 = self.encoder(x)
        out = s5
        for up, skip in zip(self.decoder, (s4, s3, s2, s1, x)):
            out = up(out, skip)
        return self.head(out)


def _size_problem(height: int, width: int) -> str | None:
    """Why the U-Net cannot take images of ``height`` × ``width`` (None: it can)."""
    if height % ENCODER_STRIDE or width % ENCODER_STRIDE:
        return f"image size {height}x{width} is not divisible by {ENCODER_STRIDE}, which the U-Net solver requires"
    return None


@dataclass
class LoadedWeights:
    """What :func:`load_resnet18_weights` did: tensor names loaded and names skipped (with why)."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError("pretrained weights file not found", path)
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise ConfigError("pretrained weights must be a .safetensors or .pth file", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # local-only: a file on this site, never one that crossed sites
    except Exception as exc:  # any parse failure of a user-supplied file
        raise ConfigError(f"cannot read pretrained weights ({type(exc).__name__}: {exc})", path) from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError("pretrained weights file is not a flat name->tensor state dict", path)
    return state


def load_resnet18_weights(module: nn.Module, path: str | Path) -> LoadedWeights:
    """Load a torchvision-format ResNet-18 state dict from a local file into ``module``.

    ``module`` has torchvision names (e.g. :class:`ResNet18Encoder`). ``fc.*`` tensors, names the
    module lacks and tensors whose shape differs (conv1 for ``in_channels != 3``) are skipped;
    everything else is copied. Raises :class:`ConfigError` naming ``path`` when the file is
    missing or unreadable or when no tensor matched.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = module.state_dict()
    result = LoadedWeights()
    to_load: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("fc."):
            result.skipped[name] = "classifier head is not used"
        elif name not in own:
            result.skipped[name] = "no such tensor in the encoder"
        elif tensor.shape != own[name].shape:
            result.skipped[name] = f"shape {tuple(tensor.shape)} != {tuple(own[name].shape)}"
        else:
            to_load[name] = tensor
    if not to_load:
        raise ConfigError("no tensor of the pretrained weights matches a ResNet-18 encoder", path)
    module.load_state_dict(to_load, strict=False)
    result.loaded = sorted(to_load)
    return result
