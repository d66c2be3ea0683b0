"""Parameters, MACs and the training compute of a run.

MACs count multiply-accumulates of convolutions and linear layers for one image (FLOPs are about
2 x MACs). Training one image costs about 3 forward passes (forward + backward for inputs and
weights), so a training epoch is ~3 x MACs x images; evaluation passes are not counted.
"""
from __future__ import annotations

import statistics
import time

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
    device = next(model.parameters()).device
    probe_forward(model, torch.zeros(1, *input_shape, device=device), hooks)
    return total


def training_macs(macs_per_image: int, images: int, epochs: float) -> float:
    return TRAIN_PASSES * macs_per_image * images * epochs


@torch.inference_mode()
def inference_throughput(model: nn.Module, input_shape, batch_size: int, device, min_seconds: float = 0.3,
                         channels_last: bool = False) -> float:
    """Measured inference images/s of ``model`` at ``batch_size`` on ``device`` (eval mode, no autograd,
    after a warm-up)."""
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    model(x)  # warm-up: allocator, cuDNN algorithm choice
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        model(x)
        runs += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= 3:
            return runs * batch_size / elapsed


def inference_side_by_side(models, input_shape, batch_size: int, device, rounds: int = 3,
                           min_seconds: float = 0.1) -> list[float]:
    """Measured inference images/s of each of ``models``: ``rounds`` rounds of
    ``inference_throughput``, the models in turn, and each model's median, so that a shared
    machine's drift falls on all of them alike (timed one after the other, the same dense network
    measured 458 and 290 images/s at batch 1 in two stages of one run)."""
    rates = [[] for _ in models]
    for _ in range(rounds):
        for model, rate in zip(models, rates):
            rate.append(inference_throughput(model, input_shape, batch_size, device, min_seconds))
    return [statistics.median(rate) for rate in rates]
