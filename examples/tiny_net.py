"""A custom segmentation network: any nn.Module mapping [B, C, H, W] → logits [B, K, H, W] that
accepts ``in_channels`` and ``num_classes``. Use it with ``model: {name: examples.tiny_net:TinyNet}``."""

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 3, width: int = 16):
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, x):
        return self.body(x)
