"""Gates: learnable coefficients on attention heads and MLP neurons, the BN scales of networks without BN.

EarlyBERT's units: one coefficient per attention head, on the head's output before the output
projection, and one per hidden neuron of an MLP, after its activation. Both sit where a
projection reads its input, so a gate is applied as a scale on that projection's *input columns*
(``proj.weight[:, cols] * g``): the same product as scaling the activations, at the cost of one
weight-sized multiply per step instead of an activation-sized one, and invisible to the attention
kernel (fused attention keeps working, and ``nn.MultiheadAttention``, which reads its output
projection's weight directly, is gated like the rest).

A :class:`Gate` is a module with a 1-D ``weight``, as a BN is: masks, importance, the detector and
the L1 term see a gate as one more prunable layer whose units are heads or neurons. It lives on
the module that owns the structure (``blocks.0.attn.head_gate``, ``blocks.0.mlp.neuron_gate``);
the projection keeps its own parameter names, so a gated network's weights load into an ungated
one and back, gates aside.

A family is one :class:`Family` (where the gates go, how the projections are sliced, which
attributes change) in ``FAMILIES``. ``attach_gates`` adds the gates, ``fold_gates`` multiplies them
into the projections and takes them off, ``prune_units`` removes the units a mask drops, exactly.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PruneError

HEAD, NEURON = "head", "neuron"


class Gate(nn.Module):
    """One coefficient per unit (``kind``: "head" or "neuron"), initialized to 1; each covers
    ``width`` consecutive input columns of the projection it gates (a head's ``head_dim``)."""

    def __init__(self, units: int, kind: str, width: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(units))
        self.kind, self.width = kind, width

    def columns(self) -> torch.Tensor:
        return self.weight.repeat_interleave(self.width) if self.width > 1 else self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.numel()} {self.kind}s" + (f" x {self.width} columns" if self.width > 1 else "")


class _GatedWeight:
    """Mixin of a gated projection: ``weight`` reads as the stored weight times the gate's columns
    (dimension 1: a linear layer's inputs, a 1x1 conv's input channels)."""

    @property
    def weight(self) -> torch.Tensor:
        w = self._parameters["weight"]
        cols = self._eb_gate.columns().to(w.dtype)
        return w * cols.view(1, -1, *(1,) * (w.dim() - 2))


class GatedLinear(_GatedWeight, nn.Linear):
    pass


class GatedConv2d(_GatedWeight, nn.Conv2d):
    pass


def _gate_projection(proj: nn.Module, gate: Gate) -> None:
    gated = GatedConv2d if isinstance(proj, nn.Conv2d) else GatedLinear
    object.__setattr__(proj, "_eb_class", type(proj))  # outside the module's registries: not saved, not moved
    object.__setattr__(proj, "_eb_gate", gate)
    proj.__class__ = gated


def _fold_projection(proj: nn.Module) -> None:
    """The gate multiplied into the stored weight, and the projection's own class back."""
    with torch.no_grad():
        proj._parameters["weight"].copy_(proj.weight)
    proj.__class__ = proj.__dict__.pop("_eb_class")
    del proj.__dict__["_eb_gate"]


# ----------------------------------------------------------------------------- slicing


def _keep_rows(layer: nn.Module, rows: torch.Tensor) -> None:
    """Keep the output rows (channels) ``rows`` of a linear layer or conv, in place."""
    with torch.no_grad():
        layer._parameters["weight"] = nn.Parameter(layer._parameters["weight"][rows].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[rows].clone())
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(rows)
    else:
        layer.out_features = len(rows)


def _keep_columns(layer: nn.Module, cols: torch.Tensor) -> None:
    """Keep the input columns (channels) ``cols`` of a linear layer or (ungrouped) conv, in place."""
    with torch.no_grad():
        layer._parameters["weight"] = nn.Parameter(layer._parameters["weight"][:, cols].clone())
    if isinstance(layer, nn.Conv2d):
        layer.in_channels = len(cols)
    else:
        layer.in_features = len(cols)


def _head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The columns of heads ``heads`` in a head-major layout of ``head_dim`` columns each."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _qkv_rows(heads: torch.Tensor, head_dim: int, width: int) -> torch.Tensor:
    """The rows of heads ``heads`` in a fused q|k|v projection of ``width`` rows per part."""
    cols = _head_columns(heads, head_dim)
    return torch.cat([part * width + cols for part in range(3)])


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """One kind of gated structure: ``owns`` says whether a module is one; ``match`` whether it can
    be gated exactly (None) or why not (a reason); ``units`` gives its (kind, units, columns per
    unit); ``projection`` the layer whose input columns the gate scales; ``prune`` keeps the listed
    units, in place, and may return a module to replace it with."""

    name: str
    owns: Callable[[nn.Module], bool]
    match: Callable[[nn.Module], Optional[str]]
    units: Callable[[nn.Module], tuple[str, int, int]]
    projection: Callable[[nn.Module], nn.Module]
    prune: Callable[[nn.Module, torch.Tensor], Optional[nn.Module]]
    gate_name: str


def _is_timm(m: nn.Module, cls: str) -> bool:
    return type(m).__name__ == cls and type(m).__module__.startswith("timm.")


def _match_timm_attention(m: nn.Module) -> Optional[str]:
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return "normalizes across heads before its projection (scale_norm)"
    if not all(isinstance(getattr(m, a, None), nn.Linear) for a in ("qkv", "proj")):
        return "has no fused qkv and proj linear layers"
    return None


def _prune_timm_attention(m: nn.Module, heads: torch.Tensor) -> None:
    rows = _qkv_rows(heads, m.head_dim, m.attn_dim)
    _keep_rows(m.qkv, rows)
    cols = _head_columns(heads, m.head_dim)
    if getattr(m, "gate", None) is not None:  # timm's own sigmoid gate on the attention output
        _keep_rows(m.gate, cols)
    _keep_columns(m.proj, cols)
    m.num_heads, m.attn_dim = len(heads), len(heads) * m.head_dim


def _match_timm_mlp(m: nn.Module) -> Optional[str]:
    if not isinstance(m.norm, nn.Identity):
        return "normalizes across its hidden neurons"
    layers = (m.fc1, m.fc2)
    if not (all(isinstance(x, nn.Linear) for x in layers)
            or all(isinstance(x, nn.Conv2d) and x.kernel_size == (1, 1) and x.groups == 1 for x in layers)):
        return "has hidden layers other than linear or 1x1 convolutions"
    return None


def _prune_mlp(fc1: nn.Module, fc2: nn.Module, neurons: torch.Tensor) -> None:
    _keep_rows(fc1, neurons)
    _keep_columns(fc2, neurons)


def _match_mha(m: nn.Module) -> Optional[str]:
    if not m._qkv_same_embed_dim:
        return "has separate key/value widths (kdim/vdim)"
    if m.bias_k is not None:
        return "has add_bias_kv"
    return None


def _prune_mha(m: nn.Module, heads: torch.Tensor) -> nn.Module:
    return PrunedMultiheadAttention.from_dense(m, heads)


def _tv_mlp(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    return block.mlp[0], block.mlp[3]


def _match_tv_block(m: nn.Module) -> Optional[str]:
    mlp = m.mlp
    if not (len(mlp) >= 4 and isinstance(mlp[0], nn.Linear) and isinstance(mlp[3], nn.Linear)):
        return "has an MLP other than linear, activation, dropout, linear"
    return None


def _is_tv_block(m: nn.Module) -> bool:
    return type(m).__name__ == "EncoderBlock" and type(m).__module__.startswith("torchvision.")


def _is_tel(m: nn.Module) -> bool:
    return isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and hasattr(m, "linear2")


# the registry: a new family is one entry (the first that owns a module gates it)
FAMILIES: list[Family] = [
    Family("timm attention", lambda m: _is_timm(m, "Attention"), _match_timm_attention,
           lambda m: (HEAD, m.num_heads, m.head_dim), lambda m: m.proj, _prune_timm_attention, "head_gate"),
    Family("timm mlp", lambda m: _is_timm(m, "Mlp"), _match_timm_mlp, lambda m: (NEURON, m.fc1.weight.shape[0], 1),
           lambda m: m.fc2, lambda m, keep: _prune_mlp(m.fc1, m.fc2, keep), "neuron_gate"),
    Family("multi-head attention", lambda m: isinstance(m, nn.MultiheadAttention), _match_mha,
           lambda m: (HEAD, m.num_heads, m.head_dim), lambda m: m.out_proj, _prune_mha, "head_gate"),
    Family("torchvision encoder block mlp", _is_tv_block, _match_tv_block,
           lambda m: (NEURON, _tv_mlp(m)[0].out_features, 1), lambda m: _tv_mlp(m)[1],
           lambda m, keep: _prune_mlp(*_tv_mlp(m), keep), "neuron_gate"),
    Family("transformer layer feed-forward", _is_tel, lambda m: None, lambda m: (NEURON, m.linear1.out_features, 1),
           lambda m: m.linear2, lambda m, keep: _prune_mlp(m.linear1, m.linear2, keep), "neuron_gate"),
]


def _family_of(m: nn.Module) -> Optional[Family]:
    return next((f for f in FAMILIES if f.owns(m)), None)


@dataclass
class Found:
    """What ``find_gates`` saw: gateable modules (name -> family), and modules that look like
    attention or an MLP but cannot be gated exactly (name -> "Class: reason")."""

    gateable: dict[str, Family]
    unsupported: dict[str, str]


def find_gates(model: nn.Module) -> Found:
    """Where gates can go in ``model``, and the attention and MLP modules they cannot go, with why."""
    gateable, unsupported = {}, {}
    for name, m in model.named_modules():
        family = _family_of(m)
        if family is not None:
            why = family.match(m)
            if why is None:
                gateable[name] = family
            else:
                unsupported[name] = f"{type(m).__name__}: {why}"
        # an attention module or MLP no family handles: named, not gated (the rest still prunes); "Attn"
        # does not count, as CNNs' channel-attention blocks (CBAM's ChannelAttn) have no heads to miss
        elif "Attention" in type(m).__name__ and not isinstance(m, PrunedMultiheadAttention):
            unsupported[name] = f"{type(m).__name__}: an attention module of a kind earlybird does not gate"
        elif type(m).__name__.endswith(("Mlp", "GLU")):  # timm's GluMlp, SwiGLU, GlobalResponseNormMlp
            unsupported[name] = f"{type(m).__name__}: an MLP of a kind earlybird does not gate"
    # an attention container whose inner module is gated (a torchvision EncoderBlock's MHA) is not a miss
    for name in list(unsupported):
        if any(g.startswith(name + ".") for g in gateable):
            del unsupported[name]
    return Found(gateable, unsupported)


def gates(model: nn.Module) -> list[tuple[str, Gate]]:
    """The gates of ``model`` as (qualified name, Gate), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Gate)]


def attach_gates(model: nn.Module) -> list[str]:
    """Put a gate (all ones: the network computes what it computed) on every gateable structure of
    ``model``; return the gates' names. Modules already gated are left as they are."""
    for name, family in find_gates(model).gateable.items():
        owner = model.get_submodule(name)
        if family.gate_name in owner._modules:
            continue
        kind, units, width = family.units(owner)
        proj = family.projection(owner)
        gate = Gate(units, kind, width).to(device=proj.weight.device)
        owner.add_module(family.gate_name, gate)
        _gate_projection(proj, gate)
    return [n for n, _ in gates(model)]


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, Family]]:
    """gate name -> (owning module, its family)."""
    out = {}
    for name, gate in gates(model):
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        family = _family_of(owner)
        if family is None:
            raise PruneError(f"gate '{name}' sits on a {type(owner).__name__}, which no gate family handles")
        out[name] = owner, family
    return out


def fold_gates(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Multiply every gate (times its keep mask in ``masks``, gate name -> bool per unit) into the
    projection it scales and take it off, in place: the network computes what the gated, masked
    one computed, without gates."""
    for name, (owner, family) in _owners(model).items():
        gate = owner._modules[family.gate_name]
        if masks is not None and name in masks:
            with torch.no_grad():
                gate.weight.mul_(masks[name].to(gate.weight))
        _fold_projection(family.projection(owner))
        del owner._modules[family.gate_name]
    return model


def prune_units(model: nn.Module, keep: Mapping[str, list[int]]) -> nn.Module:
    """Remove, in place, the units each gate of ``keep`` (gate name -> units kept, in the dense
    numbering) does not keep, folding the gates first: the result has no gates and computes what
    the gated network masked to ``keep`` computes. An owner that keeps every unit only loses its gate."""
    owners = _owners(model)
    masks = {}
    for name, kept in keep.items():
        gate = owners[name][0]._modules[owners[name][1].gate_name]
        if not kept:
            raise PruneError(f"pruning would remove every {gate.kind} of '{name.rpartition('.')[0]}': keep at least "
                             "one (lower the ratio, or keep --min-channels 1)")
        mask = torch.zeros(gate.weight.numel(), dtype=torch.bool)
        mask[kept] = True
        masks[name] = mask
    fold_gates(model, masks)
    for name, kept in keep.items():
        owner, family = owners[name]
        if len(kept) == masks[name].numel():
            continue
        replacement = family.prune(owner, torch.tensor(sorted(kept)))
        if replacement is not None:
            owner_name = name.rpartition(".")[0]
            parent, _, attr = owner_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, replacement)
    return model


def unit_shapes(model: nn.Module, keep: Mapping[str, list[int]]) -> nn.Module:
    """``prune_units`` for an ungated ``model`` (a dense network rebuilt to load a pruned checkpoint)."""
    attach_gates(model)
    return prune_units(model, keep)


# ----------------------------------------------------------------------------- pruned nn.MultiheadAttention


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with fewer heads than its embedding width holds: the kept heads'
    q, k and v rows, and the output projection's columns that read them. Same call and results as
    the dense module with the other heads' outputs zeroed. ``_qkv_same_embed_dim`` is False so that
    ``nn.TransformerEncoderLayer`` never sends it to its fused fast path, which assumes full width."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self._qkv_same_embed_dim = False
        width = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if bias else None
        self.out_proj = nn.Linear(width, embed_dim, bias=bias)

    @classmethod
    def from_dense(cls, m: nn.MultiheadAttention, heads: torch.Tensor) -> "PrunedMultiheadAttention":
        new = cls(m.embed_dim, len(heads), m.head_dim, m.dropout, m.in_proj_bias is not None, m.batch_first)
        rows, cols = _qkv_rows(heads, m.head_dim, m.embed_dim), _head_columns(heads, m.head_dim)
        new = new.to(device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype).train(m.training)
        with torch.no_grad():
            new.in_proj_weight.copy_(m.in_proj_weight[rows])
            new.out_proj.weight.copy_(m.out_proj.weight[:, cols])
            if m.in_proj_bias is not None:
                new.in_proj_bias.copy_(m.in_proj_bias[rows])
                new.out_proj.bias.copy_(m.out_proj.bias)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, batch, _ = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q), batch)
        k = self._heads(F.linear(key, w_k, b_k), batch)
        v = self._heads(F.linear(value, w_v, b_v), batch)
        mask = self._mask(attn_mask, key_padding_mask, q, k.shape[2], is_causal)
        dropout = self.dropout if self.training else 0.0
        weights: Optional[torch.Tensor] = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, self.num_heads * self.head_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def merge_masks(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                    query: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[int]]:
        """Only for TorchScript: ``nn.TransformerEncoderLayer``'s fast path (never taken, see the class)
        names it."""
        return attn_mask, None

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """(length, batch, heads x head_dim) -> (batch, heads, length, head_dim)."""
        return x.reshape(x.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def _mask(self, attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], q: torch.Tensor,
              source: int, is_causal: bool) -> Optional[torch.Tensor]:
        """One additive float mask broadcastable to (batch, heads, target, source)."""
        mask: Optional[torch.Tensor] = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                raise ValueError("a pruned attention module takes 2-D attention masks only: its per-head masks "
                                 "would be of the dense network's heads")
            mask = _additive(attn_mask, q)
        elif is_causal:
            target = q.shape[2]
            mask = torch.ones(target, source, dtype=torch.bool, device=q.device).tril().logical_not()
            mask = _additive(mask, q)
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q)[:, None, None, :]
            mask = pad if mask is None else mask + pad
        return mask


def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: do not attend) as an additive one; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)
