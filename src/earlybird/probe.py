"""One forward pass to look inside a model (shapes, MACs, which layers run, the values layers see)."""
from __future__ import annotations

import torch
from torch import nn


def probe_forward(model: nn.Module, x: torch.Tensor, hooks) -> torch.Tensor:
    """``model(x)`` in eval mode (batch statistics stay as they are) without autograd, for the
    ``hooks`` registered on it; the mode is restored and the hooks removed after, whatever happens."""
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
