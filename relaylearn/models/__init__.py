"""Plain ``nn.Module``s, no training logic: the segmentation solver and the replay GAN."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from relaylearn.errors import ConfigError


@contextmanager
def in_eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode within the block (BatchNorm running statistics, no dropout); its
    train/eval mode as before afterwards, also after an error."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def build_solver(name: str, kwargs: dict[str, Any], *, in_channels: int, num_classes: int, load_pretrained: bool = True) -> nn.Module:
    """The segmentation network of a config's ``model`` block.

    Returns a module mapping images [B, in_channels, H, W] to logits [B, num_classes, H, W].
    ``pretrained_path`` (a local ResNet-18 state dict) is applied only when ``load_pretrained``.
    """
    from relaylearn.models.unet import UNetResNet18

    if ":" in name:  # your own nn.Module: "my_package.module:MyNet", built as MyNet(**kwargs)
        from relaylearn.plugins import import_object

        kwargs = {"in_channels": in_channels, "num_classes": num_classes, **kwargs}
        return import_object(name, "common.model.name")(**kwargs)
    if name != "unet":
        raise ConfigError(f"common.model.name: unknown model '{name}' (known: unet, or 'package.module:Class')")
    kwargs = dict(kwargs)
    allowed = {"in_channels", "num_classes", "bilinear", "pretrained_path"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ConfigError(f"common.model.kwargs.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(allowed))})")
    kwargs.setdefault("in_channels", in_channels)
    kwargs.setdefault("num_classes", num_classes)
    if kwargs["in_channels"] != in_channels:
        raise ConfigError(f"common.model.kwargs.in_channels: {kwargs['in_channels']} does not match the dataset's channels {in_channels}")
    if kwargs["num_classes"] != num_classes:
        raise ConfigError(f"common.model.kwargs.num_classes: {kwargs['num_classes']} does not match the dataset's num_classes {num_classes}")
    if not load_pretrained:
        kwargs["pretrained_path"] = None
    try:
        return UNetResNet18(**kwargs)
    except ConfigError as exc:  # the weights file: name the key that points at it
        if exc.path is None:
            raise
        raise ConfigError(f"common.model.kwargs.pretrained_path: {exc.message} ({exc.path})") from None
