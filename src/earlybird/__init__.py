"""earlybird: Early-Bird tickets (You et al., ICLR 2020) for any batch-norm network, and for the
attention heads and MLP neurons of transformers (EarlyBERT's gates: ``attach_gates``).

The method's core needs no CLI::

    from earlybird import EarlyBird, add_bn_l1_grad, prune_model

    detector = EarlyBird(model, ratios=(0.3, 0.5, 0.7))
    for epoch in range(1, epochs + 1):
        ...  # train; between backward() and step(): add_bn_l1_grad(model, 1e-4)
        if detector.step(epoch) and detector.done:
            break
    small, plan = prune_model(model, detector.layer_masks(0.5), example_inputs)

Training speed (memory format, autocast, CPU kernels) is apart, in ``earlybird.accel``.
"""
__version__ = "0.1.0"

from . import data  # earlybird.data.folder / .hf: the loaders of one's own images
from .detector import EarlyBird
from .errors import CheckpointError, ConfigError, DataError, EarlyBirdError, PruneError
from .gates import attach_gates
from .importance import IMPORTANCES, BNScale, FilterNorm, Importance
from .masks import (ChannelIndex, bn_gammas, channel_mask, channel_masks, distance_matrix, mask_distance,
                    prunable_bns, prunable_units)
from .models import ModelSpec, create_model, register_model, resolve_arch
from .pretrained import load_pretrained
from .prune import PrunePlan, apply_mask, apply_plan, channel_ties, prunable_layers, prune_model
from .rules import RULES, Chain, Rule, Star
from .sparsity import add_bn_l1_grad, add_gate_l1_grad

__all__ = [
    "data",
    "IMPORTANCES", "RULES", "BNScale", "Chain", "ChannelIndex", "CheckpointError", "ConfigError", "DataError",
    "EarlyBird", "EarlyBirdError", "FilterNorm", "Importance", "ModelSpec", "PruneError", "PrunePlan", "Rule", "Star",
    "add_bn_l1_grad", "add_gate_l1_grad", "apply_mask", "attach_gates", "apply_plan", "bn_gammas", "channel_mask", "channel_masks", "channel_ties",
    "create_model", "distance_matrix", "load_pretrained", "mask_distance", "prunable_bns", "prunable_layers", "prunable_units",
    "prune_model",
    "register_model", "resolve_arch",
]
