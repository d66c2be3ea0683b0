"""Plain-PyTorch building blocks the model files share."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bn_relu(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(bn(x))``, or ``relu(bn(x) + residual)``, for a block that applies its ReLU itself.

    A norm layer that can add and activate in its own pass offers ``forward_relu(x, residual)``
    (the CPU accelerator's fused batch norm does, once ``earlybird.accel`` has switched it); any
    other is called as it is, followed by torch's add and ReLU."""
    fused = getattr(bn, "forward_relu", None)
    if fused is not None:
        return fused(x, residual)
    y = bn(x)
    return F.relu(y if residual is None else y + residual, inplace=True)
