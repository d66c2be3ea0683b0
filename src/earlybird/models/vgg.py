"""VGG with batch norm for small (CIFAR-size) inputs, as in network slimming.

Each number in a configuration is conv3x3 (no bias) -> BN -> ReLU, 'M' is a 2x2 max-pool; a
global average pool and one linear classifier follow. Any input resolution >= 16 works.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .registry import ModelSpec, init_weights, register_model, scaled

CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class VGG(nn.Module):
    def __init__(self, cfg, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        init_weights(self, bn_scale=0.5)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg", depths=tuple(CONFIGS))
def vgg(spec: ModelSpec) -> VGG:
    if spec.depth not in CONFIGS:
        raise ConfigError(f"VGG depth {spec.depth} is not one of {sorted(CONFIGS)}: pass --depth 11, 13, 16 or 19")
    if spec.image_size < 16:
        raise ConfigError(f"VGG's four max-pools need inputs of at least 16x16, not {spec.image_size}")
    cfg = [v if v == "M" else scaled(v, spec.width) for v in CONFIGS[spec.depth]]
    return VGG(cfg, spec.in_channels, spec.num_classes)
