"""DenseNet for CIFAR (depth 3n+4, growth rate 12, no bottleneck), as in network slimming: every
layer is BN -> ReLU -> conv3x3 and concatenates its output to its input; transitions are
BN -> ReLU -> conv1x1 -> 2x2 average pool."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .layers import bn_relu
from .registry import ModelSpec, init_weights, register_model, scaled


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(bn_relu(self.bn, x))], 1)


class Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(bn_relu(self.bn, x)))


class DenseNet(nn.Module):
    def __init__(self, depth: int = 40, in_channels: int = 3, num_classes: int = 10, growth: int = 12):
        super().__init__()
        n = (depth - 4) // 3
        c = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if block < 2:
                layers.append(Transition(c, c))
        self.features = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self, bn_scale=0.5)

    def forward(self, x):
        return self.fc(self.pool(bn_relu(self.bn, self.features(x))).flatten(1))


@register_model("densenet", depths=(40, 100))
def densenet(spec: ModelSpec) -> DenseNet:
    if spec.depth < 7 or (spec.depth - 4) % 3:
        raise ConfigError(f"DenseNet depth {spec.depth} is not 3n+4: pass e.g. --depth 40")
    return DenseNet(spec.depth, spec.in_channels, spec.num_classes, scaled(12, spec.width))
