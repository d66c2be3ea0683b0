"""Physical channel pruning with a dependency graph (Torch-Pruning), plus BN-shift folding.

Removing a BN channel removes the producing conv's filter and every consumer's input slice
(Torch-Pruning follows the graph through activations, pooling, flatten, residual adds ...).
A channel whose gamma is masked to zero still emits a constant (its BN shift, through the
activation); that constant is folded into each consumer, so the pruned network computes exactly
what the masked dense network computes:

* a linear consumer, or a conv that sees no zero padding, gets it in its bias;
* a zero-padded conv sees the constant only where its window overlaps the image, so the fold
  is a per-position map (:class:`ConstantFoldConv2d`), computed once per input size.

The result is described by a :class:`PrunePlan` (kept channel indices per BN layer and the
folds), which rebuilds the pruned architecture from the dense one, so checkpoints hold only
tensors and plain values.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from .errors import PruneError
from .masks import check_not_empty, prunable_bns, split_mask


class ConstantFoldConv2d(nn.Conv2d):
    """A conv plus the fixed contribution of removed constant input channels.

    ``fold_kernel`` (out_channels x 1 x kh x kw) is sum_c a_c * W[:, c] over the removed
    channels c with constant value a_c; convolving it with an all-ones image under the conv's
    own padding reproduces exactly what those channels added, borders included.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kh, kw = self.kernel_size
        self.register_buffer("fold_kernel", torch.zeros(self.out_channels, 1, kh, kw))
        self._fold_cache: dict = {}

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConstantFoldConv2d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict(), strict=False)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + ", constant_fold=True"

    def fold_map(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        kernel = self.fold_kernel  # the key changes when the kernel is replaced, sliced or loaded into
        key = (height, width, like.device, like.dtype, kernel.data_ptr(), tuple(kernel.shape), kernel._version)
        if key not in self._fold_cache:
            ones = torch.ones(1, 1, height, width, device=like.device, dtype=like.dtype)
            kernel = kernel.to(like.dtype)
            self._fold_cache = {key: F.conv2d(ones, kernel, None, self.stride, self.padding, self.dilation)}
        return self._fold_cache[key]

    def forward(self, x):
        return super().forward(x) + self.fold_map(x.shape[-2], x.shape[-1], x)


@dataclass
class PrunePlan:
    """What was removed: kept channel indices per BN layer, and how constants were folded."""

    input_shape: list[int]
    keep: dict[str, list[int]]
    folds: dict[str, str] = field(default_factory=dict)  # consumer name -> "bias" | "map"

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "keep": self.keep, "folds": self.folds}

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        return cls(list(d["input_shape"]), {k: list(v) for k, v in d["keep"].items()}, dict(d["folds"]))


def layer_masks(model: nn.Module, mask) -> dict[str, torch.Tensor]:
    """Per-layer keep masks from a flat mask over ``prunable_bns(model)`` (or pass a dict through)."""
    named = prunable_bns(model)
    if isinstance(mask, dict):
        unknown = set(mask) - {n for n, _ in named}
        if unknown:
            raise PruneError(f"mask names layers the model does not have: {', '.join(sorted(unknown))}")
        return {n: mask[n].bool() for n, _ in named if n in mask}
    sizes = [m.weight.numel() for _, m in named]
    if mask.numel() != sum(sizes):
        raise PruneError(
            f"mask has {mask.numel()} entries but the model has {sum(sizes)} BN channels: "
            "was it computed on another architecture?"
        )
    return {n: piece.bool() for (n, _), piece in zip(named, split_mask(mask, sizes))}


def apply_mask(model: nn.Module, mask) -> nn.Module:
    """A copy of ``model`` with the scale of every pruned channel set to zero (the masked net)."""
    masked = copy.deepcopy(model)
    bns = dict(prunable_bns(masked))
    with torch.no_grad():
        for name, keep in layer_masks(masked, mask).items():
            bns[name].weight.mul_(keep.to(bns[name].weight))
    return masked


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class _FoldConvPruner(tp.pruner.function.ConvPruner):
    """Torch-Pruning handler that also slices the fold kernel when output channels go."""

    def prune_out_channels(self, layer: ConstantFoldConv2d, idxs):
        kept = sorted(set(range(layer.out_channels)) - set(int(i) for i in idxs))
        layer.fold_kernel = layer.fold_kernel[kept].contiguous()
        return super().prune_out_channels(layer, idxs)


def _dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=example, verbose=False,
        customized_pruners={ConstantFoldConv2d: _FoldConvPruner()},
    )


def _bn_groups(model: nn.Module, dg: tp.DependencyGraph, keep: dict[str, list[int]]):
    """Yield (bn name, pruning group) for every layer that loses channels."""
    bns = dict(prunable_bns(model))
    for name, kept in keep.items():
        size = bns[name].weight.numel()
        drop = sorted(set(range(size)) - set(kept))
        if drop:
            yield name, dg.get_pruning_group(bns[name], tp.prune_batchnorm_out_channels, idxs=drop)


def _consumers(model: nn.Module, dg: tp.DependencyGraph, group) -> list[tuple[str, list[int]]]:
    """The conv/linear layers that read the group's channels, with the input indices they lose."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, (nn.Conv2d, nn.Linear)) and dg.is_in_channel_pruning_fn(dep.handler):
            out.append((names[module], [int(i) for i in idxs]))
    return out


@torch.no_grad()
def _probe_constants(masked: nn.Module, example: torch.Tensor, wanted: dict[str, list[int]]):
    """Run the masked net once; return the constant value of each removed channel at each consumer."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, idxs in wanted.items():
        def grab(module, inputs, name=name, idxs=idxs):
            seen[name] = inputs[0][:, idxs].detach()
        hooks.append(masked.get_submodule(name).register_forward_pre_hook(grab))
    was_training = masked.training
    try:
        masked.eval()
        masked(example)
    finally:
        masked.train(was_training)
        for h in hooks:
            h.remove()
    constants = {}
    for name, x in seen.items():
        x = x.double()
        value = x[0].reshape(x.shape[1], -1)[:, 0]
        spread = (x - value.view(1, -1, *([1] * (x.dim() - 2)))).abs().max().item()
        if spread > 1e-4 * (1 + value.abs().max().item()):
            raise PruneError(
                f"pruned channels do not reach layer '{name}' as constants (they mix with other signals), "
                "so they cannot be removed exactly; keep those layers out of the mask"
            )
        constants[name] = value
    return constants


def _fold_into(consumer: nn.Module, idxs: list[int], value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The fold of constant inputs ``value`` at ``idxs``: ("bias", vector) or ("map", kernel)."""
    w = consumer.weight.detach().double()
    if isinstance(consumer, nn.Linear):
        return "bias", w[:, idxs] @ value
    if consumer.groups != 1:
        raise PruneError(f"cannot fold removed channels into grouped conv: keep its inputs unpruned")
    kernel = torch.einsum("oc...,c->o...", w[:, idxs], value)
    no_zero_padding = all(p == 0 for p in consumer.padding) or consumer.padding_mode != "zeros"
    if no_zero_padding:
        return "bias", kernel.sum(dim=(1, 2))
    return "map", kernel.unsqueeze(1)


def _prepare_fold(model: nn.Module, name: str, kind: str) -> nn.Module:
    """Give consumer ``name`` the slot its fold needs (a zero bias, or a fold kernel)."""
    module = model.get_submodule(name)
    if kind == "map" and not isinstance(module, ConstantFoldConv2d):
        module = ConstantFoldConv2d.from_conv(module)
        _replace_module(model, name, module)
    if kind == "bias" and module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.out_features if isinstance(module, nn.Linear) else module.out_channels,
                                               device=module.weight.device, dtype=module.weight.dtype))
    return module


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Shrink a dense ``model`` in place to the architecture of ``plan`` (weights still to load)."""
    example = torch.zeros(1, *plan.input_shape, device=next(model.parameters()).device)
    for name, kind in plan.folds.items():
        _prepare_fold(model, name, kind)
    dg = _dependency_graph(model, example)
    for _, group in _bn_groups(model, dg, plan.keep):
        group.prune()
    return model


def prune_model(model: nn.Module, mask, example_inputs: torch.Tensor) -> tuple[nn.Module, PrunePlan]:
    """Return a physically smaller copy of ``model`` and its plan.

    ``mask`` is a flat keep-mask over ``prunable_bns(model)`` (as produced by
    :func:`earlybird.channel_masks` or the detector) or a dict BN name -> keep mask.
    ``example_inputs`` is one batch (any size >= 1) of the model's input. The result's outputs
    equal those of ``apply_mask(model, mask)`` in eval mode, to float rounding.
    """
    masks = layer_masks(model, mask)
    for name, keep in masks.items():
        check_not_empty(name, keep)
    keep = {n: torch.nonzero(k).flatten().tolist() for n, k in masks.items()}
    plan = PrunePlan(list(example_inputs.shape[1:]), keep)

    pruned = copy.deepcopy(model)
    example = example_inputs[:1].to(next(pruned.parameters()).device)
    dg = _dependency_graph(pruned, example)
    wanted: dict[str, list[int]] = {}
    for _, group in _bn_groups(pruned, dg, keep):
        for name, idxs in _consumers(pruned, dg, group):
            wanted[name] = sorted(set(wanted.get(name, [])) | set(idxs))
    constants = _probe_constants(apply_mask(model, masks), example_inputs[:2].to(example), wanted)
    folds = {name: _fold_into(pruned.get_submodule(name), wanted[name], constants[name]) for name in wanted}

    # Fold into the dense consumers first: pruning then slices bias and fold kernel along
    # with the consumers' own output channels.
    with torch.no_grad():
        for name, (kind, value) in folds.items():
            module = _prepare_fold(pruned, name, kind)
            target = module.bias if kind == "bias" else module.fold_kernel
            target.add_(value.to(target))
            plan.folds[name] = kind
    dg = _dependency_graph(pruned, example)
    for _, group in _bn_groups(pruned, dg, keep):
        group.prune()
    return pruned, plan
