"""Parameters, MACs and the training compute of a run.

MACs count multiply-accumulates of convolutions and linear layers for one image (FLOPs are about
2 x MACs). Training one image costs about 3 forward passes (forward + backward for inputs and
weights), so a training epoch is ~3 x MACs x images; evaluation passes are not counted.
"""
from __future__ import annotations

import torch
from torch import nn

from .probe import probe_forward

TRAIN_PASSES = 3


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape) -> int:
    """MACs of one forward pass on a single input of shape ``input_shape`` (C, H, W)."""
    total = 0

    def conv_hook(m: nn.Conv2d, inputs, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    like = next(model.parameters())  # an input on the model's device and in its number format (a float64 model too)
    probe_forward(model, torch.zeros(1, *input_shape, device=like.device, dtype=like.dtype), hooks)
    return total


def training_macs(macs_per_image: int, images: int, epochs: float) -> float:
    return TRAIN_PASSES * macs_per_image * images * epochs
