"""Physical pruning: the dependency-aware engine and the layers a pruned network may need."""
from .engine import (PrunePlan, apply_mask, apply_plan, channel_producers, channel_ties, layer_masks, plan_pruning,
                     prunable_layers, prune_model, pruned_architecture, shapes_only)
from .layers import ConstantFoldConv2d, SelectBatchNorm2d, SelectConv2d

__all__ = ["ConstantFoldConv2d", "PrunePlan", "SelectBatchNorm2d", "SelectConv2d", "apply_mask", "apply_plan", "channel_producers",
           "channel_ties", "layer_masks", "plan_pruning", "prunable_layers", "prune_model",
           "pruned_architecture", "shapes_only"]
