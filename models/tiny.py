"""A tiny CNN (a few thousand parameters) so tests can train real models in seconds."""
from __future__ import annotations

from torch import nn


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (the second strided), global average pooling, one linear layer."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, width, 1), *_conv_bn(width, 2 * width, 2), *_conv_bn(2 * width, 2 * width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
