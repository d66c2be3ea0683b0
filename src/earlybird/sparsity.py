"""Network-slimming sparsity: the L1 subgradient on batch-norm scales, and on gates (EarlyBERT)."""
from __future__ import annotations

import torch

from torch import nn

from .gates import gates
from .masks import bn_list


@torch.no_grad()
def add_bn_l1_grad(model_or_bns, strength: float) -> None:
    """Add ``strength * sign(gamma)`` to every BN scale's gradient (the subgradient of L1).

    Call it between ``backward()`` and ``optimizer.step()``. Under mixed precision call it after
    ``scaler.unscale_(optimizer)``: added to still-scaled gradients, the term would be divided
    by the loss scale and vanish.
    """
    for bn in bn_list(model_or_bns):
        if bn.weight.grad is not None:
            bn.weight.grad.add_(torch.sign(bn.weight), alpha=strength)


@torch.no_grad()
def add_gate_l1_grad(model: nn.Module, strength: float) -> None:
    """Add ``strength * sign(g)`` to the gradient of every head and neuron gate of ``model``
    (``earlybird.gates``), as ``add_bn_l1_grad`` does to BN scales, and at the same point."""
    for _, gate in gates(model):
        if gate.weight.grad is not None:
            gate.weight.grad.add_(torch.sign(gate.weight), alpha=strength)
