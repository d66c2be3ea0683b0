"""ResNets: the standard ImageNet definitions (torchvision's layout, v1.5 strides) and the CIFAR
pre-activation bottleneck PreResNet of network slimming (depth 9n+2).

For inputs of 64x64 or smaller the ImageNet ResNets use a CIFAR stem (3x3 conv, stride 1, no
max-pool), as is usual for CIFAR; larger inputs get the 7x7/2 conv and the 3x3/2 max-pool.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .layers import bn_relu
from .registry import ModelSpec, init_weights, register_model, scaled


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu(self.bn1, self.conv1(x))
        return bn_relu(self.bn2, self.conv2(out), identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu(self.bn1, self.conv1(x))
        out = bn_relu(self.bn2, self.conv2(out))
        return bn_relu(self.bn3, self.conv3(out), identity)


RESNET_LAYERS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
                 101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}


class ResNet(nn.Module):
    def __init__(self, block, layers, in_channels: int = 3, num_classes: int = 1000, width: float = 1.0,
                 small_input: bool = False):
        super().__init__()
        planes = [scaled(p, width) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.layer1 = self._stage(block, planes[0], layers[0], 1)
        self.layer2 = self._stage(block, planes[1], layers[1], 2)
        self.layer3 = self._stage(block, planes[2], layers[2], 2)
        self.layer4 = self._stage(block, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        init_weights(self, bn_scale=1.0)

    def _stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(bn_relu(self.bn1, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model("resnet", depths=sorted(RESNET_LAYERS))
def resnet(spec: ModelSpec) -> ResNet:
    if spec.depth not in RESNET_LAYERS:
        if (spec.depth - 2) % 9 == 0 and spec.depth > 2:  # the reference's CIFAR "resnet" is pre-activation
            raise ConfigError(f"ResNet depth {spec.depth} is the reference code's CIFAR pre-activation ResNet: pass "
                              f"--arch preresnet --depth {spec.depth} (--arch resnet is the ImageNet ResNet, depth "
                              f"{', '.join(map(str, sorted(RESNET_LAYERS)))})")
        raise ConfigError(f"ResNet depth {spec.depth} is not one of {sorted(RESNET_LAYERS)}: pass e.g. --arch resnet18")
    block, layers = RESNET_LAYERS[spec.depth]
    return ResNet(block, layers, spec.in_channels, spec.num_classes, spec.width, small_input=spec.image_size <= 64)


class PreBottleneck(nn.Module):
    """bn1 -> relu -> conv1 (1x1) -> bn2 -> relu -> conv2 (3x3) -> bn3 -> relu -> conv3 (1x1, 4x) + shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.downsample = downsample

    def forward(self, x):
        out = self.conv1(bn_relu(self.bn1, x))
        out = self.conv2(bn_relu(self.bn2, out))
        out = self.conv3(bn_relu(self.bn3, out))
        return out + (x if self.downsample is None else self.downsample(x))


class PreResNet(nn.Module):
    """Network slimming's CIFAR PreResNet: stages of 16/32/64 planes (streams 64/128/256)."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        n = (depth - 2) // 9
        planes = [scaled(p, width) for p in (16, 32, 64)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.layer1 = self._stage(planes[0], n, 1)
        self.layer2 = self._stage(planes[1], n, 2)
        self.layer3 = self._stage(planes[2], n, 2)
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        init_weights(self, bn_scale=0.5)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False)
        layers = [PreBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [PreBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.avgpool(bn_relu(self.bn, x)).flatten(1))


@register_model("preresnet", depths=(20, 56, 101, 164))
def preresnet(spec: ModelSpec) -> PreResNet:
    if spec.depth < 11 or (spec.depth - 2) % 9:
        raise ConfigError(f"PreResNet depth {spec.depth} is not 9n+2: pass --depth 20, 56, 101 or 164")
    return PreResNet(spec.depth, spec.in_channels, spec.num_classes, spec.width)
