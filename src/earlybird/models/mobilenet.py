"""MobileNetV2 (inverted residuals, depthwise convolutions), sized for CIFAR-like inputs as well.

Strides follow the ImageNet model; for inputs of 64x64 or smaller the stem and the second stage
keep stride 1, as CIFAR versions do.
"""
from __future__ import annotations

from torch import nn

from .registry import ModelSpec, init_weights, register_model, scaled

# expansion t, output channels c, repeats n, first stride s
STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: float = 1.0, small_input: bool = False):
        super().__init__()
        c = scaled(32, width)
        layers = [conv_bn(in_channels, c, 3, 1 if small_input else 2)]
        for i, (t, out, n, s) in enumerate(STAGES):
            out = scaled(out, width)
            stride = 1 if small_input and i == 1 else s
            for j in range(n):
                layers.append(InvertedResidual(c, out, stride if j == 0 else 1, t))
                c = out
        last = scaled(1280, max(width, 1.0))
        layers.append(conv_bn(c, last))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self, bn_scale=1.0)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("mobilenetv2")
def mobilenetv2(spec: ModelSpec) -> MobileNetV2:
    return MobileNetV2(spec.in_channels, spec.num_classes, spec.width, small_input=spec.image_size <= 64)
