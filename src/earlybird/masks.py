"""Channel masks from batch-norm scale factors, and the distance between masks.

A *mask* is one flat boolean vector over the units of a list of layers, in that order (True =
keep): the channels of BN layers, and the heads and neurons of gates (``earlybird.gates``), whose
``weight`` plays the BN scale's part. Each kind of unit is ranked apart, as the scales of a BN and
of a gate are not on one scale: BN channels and MLP neurons each against one global threshold,
attention heads within their layer. Its length is fixed for a given architecture, so two
epochs' masks can be compared position by position.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, PruneError
from .gates import HEAD, NEURON, Gate

CHANNEL = "channel"  # the kind of a BN's units
_BN_TYPES = (nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm)


def prunable_bns(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """All affine batch-norm layers of ``model`` as (qualified name, module), in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BN_TYPES) and m.affine and m.weight is not None
    ]


def prunable_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose units masks are drawn over: the affine BNs and the gates, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, Gate) or (isinstance(m, _BN_TYPES) and m.affine and m.weight is not None)]


def unit_kind(layer: nn.Module) -> str:
    """"channel" for a BN, "head" or "neuron" for a gate."""
    return layer.kind if isinstance(layer, Gate) else CHANNEL


def bn_list(bns) -> list[nn.modules.batchnorm._BatchNorm]:
    """``bns`` (a model, or a list of BN layers or of (name, BN) pairs) as a list of BN layers."""
    if isinstance(bns, nn.Module):
        return [m for _, m in prunable_bns(bns)]
    out = [m[1] if isinstance(m, tuple) else m for m in bns]
    if not out:
        raise ConfigError("no batch-norm layers to compute a mask from: pass a model with BatchNorm")
    return out


@dataclass(frozen=True)
class ChannelIndex:
    """The positions of a flat mask: layer names (BNs and gates), their unit counts and the kind of
    their units ("channel", "head", "neuron"), in mask order.

    Every flat mask, score vector and tie list of a run is laid out by one index; ``split`` and
    ``join`` convert between it and per-layer tensors (layer name -> tensor)."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    kinds: tuple[str, ...] = ()  # empty: all BN channels

    @classmethod
    def of(cls, model: nn.Module, layers: Sequence[str] | None = None) -> "ChannelIndex":
        """The index of ``model``'s prunable BNs and gates, or of those named in ``layers`` (in that order)."""
        named = dict(prunable_units(model))
        names = list(named) if layers is None else list(layers)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ConfigError(f"no batch-norm layers or gates named {', '.join(unknown)} in the model")
        if not names:
            raise ConfigError("the model has no batch-norm layers and no gates: Early-Bird masks come from BN scales, "
                              "or from gates on attention heads and MLP neurons (earlybird.gates.attach_gates)")
        kinds = tuple(unit_kind(named[n]) for n in names)
        return cls(tuple(names), tuple(named[n].weight.numel() for n in names),
                   kinds if any(k != CHANNEL for k in kinds) else ())

    def kind_sizes(self, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
        """Units of each kind, e.g. {"channel": 1200, "head": 36}; of ``sizes`` (layer name -> units,
        e.g. a pruned network's) instead of the index's own where given."""
        own = self.layer_sizes()
        out: dict[str, int] = {}
        for kind, name in zip(self.kinds or (CHANNEL,) * len(self.names), self.names):
            out[kind] = out.get(kind, 0) + (sizes or own)[name]
        return out

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def layer_sizes(self) -> dict[str, int]:
        return dict(zip(self.names, self.sizes))

    def offsets(self) -> dict[str, int]:
        """Where each layer's channels start in the flat mask."""
        return dict(zip(self.names, [sum(self.sizes[:i]) for i in range(len(self.sizes))]))

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat tensor as BN name -> that layer's piece."""
        if flat.numel() != self.total:
            raise ValueError(f"a mask of {flat.numel()} positions does not fit {self.total} channels of "
                             f"{len(self.names)} layers")
        return dict(zip(self.names, torch.split(flat, list(self.sizes))))

    def join(self, per_layer: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-layer tensors (one per name, in any order) as one flat tensor."""
        return torch.cat([per_layer[n].flatten() for n in self.names])

    def bns(self, model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
        return [model.get_submodule(n) for n in self.names]

    def flat_ties(self, ties: Iterable[Iterable[tuple[str, int]]]) -> list[list[int]]:
        """``ties`` as (BN name, channel) lists (``earlybird.prune.channel_ties``) turned into flat
        positions; channels of other layers are dropped, and so are lists left with one position."""
        offset = self.offsets()
        flat = [[offset[n] + c for n, c in tied if n in offset] for tied in ties]
        return [t for t in flat if len(t) > 1]


UNIT_WORDS = {CHANNEL: "BN channels", HEAD: "attention heads", NEURON: "MLP neurons"}


def describe_units(kind_sizes: Mapping[str, int], adjective: str = "") -> str:
    """Counts of units by kind in words: "1200 BN channels", "6 attention heads and 384 MLP neurons"
    (``adjective``, e.g. "prunable", before each kind)."""
    return " and ".join(f"{n} {adjective + ' ' if adjective else ''}{UNIT_WORDS[k]}" for k, n in kind_sizes.items())


def bn_gammas(bns) -> torch.Tensor:
    """|gamma| of every channel of ``bns`` (a model or a list of BN layers), flattened, on CPU."""
    with torch.no_grad():
        return torch.cat([m.weight.detach().abs().flatten().float().cpu() for m in bn_list(bns)])


def check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"pruning ratio {ratio:g} is outside (0, 1): pass e.g. 0.3 for 30% of channels")
    return ratio


def _rank_groups(layer_sizes: Sequence[int], kinds: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    """The flat positions ranked together, with their kind: all channels, all neurons, and each layer's heads."""
    groups: dict[object, list[torch.Tensor]] = {}
    start = 0
    for i, size in enumerate(layer_sizes):
        kind = kinds[i] if kinds else CHANNEL
        groups.setdefault((kind, i) if kind == HEAD else kind, []).append(torch.arange(start, start + size))
        start += size
    return [(key[0] if isinstance(key, tuple) else key, torch.cat(g)) for key, g in groups.items()]


def channel_mask(
    gammas: torch.Tensor, ratio: float, layer_sizes: Sequence[int], min_channels: int = 1,
    ties: Sequence[Sequence[int]] = (), kinds: Sequence[str] = (), kind_ratios: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Keep-mask that prunes the ``floor(N * ratio)`` smallest |gamma| over all layers.

    With ``kinds`` (one per layer, as ``ChannelIndex.kinds``), each kind is ranked apart at
    ``ratio``: BN channels over all their layers, MLP neurons over all theirs, attention heads
    within each layer; ``kind_ratios`` (e.g. {"head": 0.25}) prunes a kind at its own ratio instead.

    Ties are broken by position (a stable sort), so a mask is a deterministic function of the
    gammas. Each index set in ``ties`` (flat positions that can only be removed together) is
    ranked by its mean |gamma|, so it is kept or removed as one. The collapse guard then gives
    back, in every layer left with fewer than ``min_channels`` channels, that layer's
    largest-|gamma| channels: the mask prunes slightly fewer channels than asked, but never
    empties a layer. ``min_channels=0`` turns the guard off.
    """
    ratio = check_ratio(ratio)
    n = gammas.numel()
    if sum(layer_sizes) != n:
        raise ValueError(f"layer sizes add up to {sum(layer_sizes)} but there are {n} gammas")
    scores = gammas
    if ties:  # channels that go together (one position in every group of a grouped conv) rank as one
        scores = gammas.clone()
        for tied in ties:
            scores[list(tied)] = gammas[list(tied)].mean()
    keep = torch.ones(n, dtype=torch.bool)
    for kind, positions in _rank_groups(layer_sizes, kinds):
        order = positions[torch.sort(scores[positions], stable=True).indices]
        keep[order[: int(len(positions) * (kind_ratios or {}).get(kind, ratio))]] = False
    if min_channels > 0:
        start = 0
        for size in layer_sizes:
            layer = slice(start, start + size)
            need = min(min_channels, size)
            if int(keep[layer].sum()) < need:
                top = torch.topk(gammas[layer], need).indices + start
                keep[top] = True
            start += size
    return keep


def channel_masks(
    bns, ratios: Iterable[float], min_channels: int = 1
) -> dict[float, torch.Tensor]:
    """Masks for several ratios from one snapshot of ``bns`` (a model or a list of BN layers)."""
    layers = bn_list(bns)
    gammas = bn_gammas(layers)
    sizes = [m.weight.numel() for m in layers]
    return {float(r): channel_mask(gammas, r, sizes, min_channels) for r in ratios}


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalized Hamming distance: the fraction of positions where two masks differ."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different lengths ({a.numel()} vs {b.numel()}) cannot be compared")
    # Exact ratio of integers: a float32 mean would put 4/40 just above a 0.1 threshold.
    return int((a != b).sum()) / a.numel()


def distance_matrix(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise normalized Hamming distances of a sequence of masks (an E x E matrix)."""
    # counts of differing positions, exact in float64, divided as mask_distance divides them
    stacked = torch.stack([m.double() for m in masks])
    n = stacked.shape[1]
    differ = stacked @ (1 - stacked).T + (1 - stacked) @ stacked.T
    return differ / n


def check_not_empty(name: str, keep: torch.Tensor) -> None:
    """Refuse a per-layer mask that would remove every channel of a layer."""
    if not bool(keep.any()):
        raise PruneError(
            f"pruning would remove all {keep.numel()} channels of layer '{name}': "
            "lower --percent or keep the collapse guard on (--min-channels 1)"
        )
