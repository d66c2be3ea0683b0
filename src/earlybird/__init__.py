"""earlybird: Early-Bird tickets (You et al., ICLR 2020) for any batch-norm network.

The method's core needs no CLI::

    from earlybird import EarlyBird, add_bn_l1_grad, prune_model

    detector = EarlyBird(model, ratios=(0.3, 0.5, 0.7))
    for epoch in range(1, epochs + 1):
        ...  # train; between backward() and step(): add_bn_l1_grad(model, 1e-4)
        if detector.step(epoch) and detector.done:
            break
    small, plan = prune_model(model, detector.tickets[0.5], example_inputs)
"""
__version__ = "0.1.0"

from .detector import EarlyBird
from .errors import CheckpointError, ConfigError, DataError, EarlyBirdError, PruneError
from .kernels import FusedBatchNorm2d, bn_relu, fuse_batch_norm
from .kernels.conv import GemmConv2d
from .importance import IMPORTANCES, BNScale, FilterNorm, Importance
from .masks import (ChannelIndex, bn_gammas, channel_mask, channel_masks, distance_matrix, mask_distance,
                    prunable_bns)
from .models import ModelSpec, create_model, register_model, resolve_arch
from .prune import PrunePlan, apply_mask, apply_plan, channel_ties, prunable_layers, prune_model
from .rules import RULES, Chain, Rule, Star
from .sparsity import add_bn_l1_grad
from .train.tuning import gemm_convolutions, use_gemm

__all__ = [
    "IMPORTANCES", "RULES", "BNScale", "Chain", "ChannelIndex", "CheckpointError", "ConfigError", "DataError",
    "EarlyBird", "EarlyBirdError", "FilterNorm", "FusedBatchNorm2d", "GemmConv2d", "Importance", "ModelSpec",
    "PruneError", "PrunePlan", "Rule", "Star", "add_bn_l1_grad", "apply_mask", "apply_plan", "bn_gammas", "bn_relu",
    "channel_mask", "channel_masks", "channel_ties", "create_model", "distance_matrix", "fuse_batch_norm",
    "gemm_convolutions", "mask_distance", "prunable_bns", "prunable_layers", "prune_model", "register_model",
    "resolve_arch", "use_gemm",
]
