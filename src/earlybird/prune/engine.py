"""Physical channel pruning of any batch-norm CNN, exact to the masked network.

The dependency graph comes from Torch-Pruning: removing a channel removes the filter that
produces it and every input slice that reads it, through activations, pooling, flatten, residual
additions, concatenations and depthwise convolutions. Our rules on top of it:

* **Coupled channels.** Channels tied together (the same channel of a residual stream at every
  block, a depthwise conv's input and output, a concatenated map and the BNs that read it) form a
  *class*. A class is removed only when every BN in it is masked and every layer that reads it
  sees a constant ("a coupled group keeps a channel if any member needs it"); otherwise it stays
  in every member and those members keep their scales (the *effective* mask).
* **Dead channels.** A BN channel whose every path leads, through channelwise ops and depthwise
  convs only, into BNs that mask it feeds nothing but constants: it counts as masked. So a
  MobileNet block whose depthwise BN masks a channel loses it from the expansion conv and BN too
  (rather than computing it only to select it away).
* **Readers of a kept stream.** A BN that only reads a stream (pre-activation, DenseNet) and
  masks channels the stream keeps becomes a :class:`SelectBatchNorm2d`: it gathers the channels
  it keeps, so its branch still shrinks, as the reference's ``channel_selection`` does.
* ``keep_streams=True`` never removes a channel of a residual stream or concatenation
  (the reference's PreResNet behaviour); readers still select.
* **Folding.** A removed channel whose BN scale was masked still emits a constant (its BN shift
  through the activation); it is folded into each consumer: into the bias of a linear layer or of
  a conv that sees no zero padding, or, for a zero-padded conv, as a per-position map
  (:class:`ConstantFoldConv2d`). The pruned network's outputs equal the masked dense network's, on
  every input: whether a consumer reads a constant is decided from the graph, never from values
  on a batch (a gate that saturates on the example inputs still varies on others). Each read is an
  expression over the BN channels and the operations on the way (channelwise functions, pooling,
  adds, products, concatenations); a conv, a per-sample gate or anything unknown varies. The folded
  values are computed in float64, and the masked network's values on the example only cross-check.
* **Shift-zeroing.** Where that constant reaches a consumer as a varying value (a
  squeeze-and-excitation gate multiplies it per sample; a zero-padded average pool changes it at
  the borders), the masked network zeroes the channel's shift too, so it emits act(0), a zero that
  both pass as a zero (where act(0) = 0); ``PrunePlan.zeroed`` lists those channels.
* **Verification.** A float64 build of every plan is checked against the float64 masked network
  on the example inputs and on inputs of other statistics (scaled, shifted, smooth); a difference
  is a :class:`PruneError`.
* **Grouped convolutions** lose a channel position from every group or from none: position p of
  each group is one class (and ``channel_ties`` gives the masks these classes to rank as one).
* **Refusal.** A BN whose channels reach an operation the engine cannot prune through (a shuffle, a
  split the graph numbers wrongly, a conv over channels) keeps them all; only a mask that removes
  some of them is an error, and ``prunable_layers`` leaves such BNs out. Whatever Torch-Pruning or
  a foreign model raises becomes a one-line :class:`PruneError`.

* **Heads and neurons.** Gates (``earlybird.gates``) are pruned before the channels: each gate is
  folded into the projection it scales, its masked units' rows and columns sliced away and the
  attributes the forward reads updated; the BN channels are then planned and removed on that
  network, and the result is verified against the gated, masked dense network.

The result is described by a :class:`PrunePlan` (plain values), which rebuilds the pruned
architecture from the dense one, so checkpoints hold only tensors and plain values.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from ..errors import EarlyBirdError, PruneError
from ..gates import NEURON, gates, prune_units, unit_shapes
from ..masks import ChannelIndex, check_not_empty, prunable_bns, prunable_units
from ..probe import probe_forward
from .layers import CUSTOM_PRUNERS, ConstantFoldConv2d, SelectBatchNorm2d, SelectConv2d

# Functional ops that act on each channel separately (Torch-Pruning treats unknown ops as such).
_CHANNELWISE_OPS = (
    "relu", "hardtanh", "silu", "gelu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leakyrelu", "elu",
    "softplus", "mish", "add", "sub", "mul", "div", "neg", "clamp", "maxpool", "avgpool", "adaptiveavgpool",
    "adaptivemaxpool", "mean", "clone", "upsample", "dropout", "constantpadnd", "reflectionpad", "replicationpad",
    "tocopy", "alias",
    # a BN computed inside a module whose output is taken later (timm's BatchNormAct2d: BN, drop, act)
    "nativebatchnorm", "cudnnbatchnorm", "miopenbatchnorm",
)
# Modules Torch-Pruning can slice whose channels stay channels (anything else mixes or moves them).
_LAYERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass
class PrunePlan:
    """What was removed, in the dense network's channel numbering.

    ``keep``: per BN, the output channels it keeps (the effective mask); ``selects``: BNs that
    became :class:`SelectBatchNorm2d` (and convs that became :class:`SelectConv2d`); ``folds``: consumer -> "bias" | "map"; ``removed``:
    "module:out" / "module:in" -> the channel indices removed from that side of that module;
    ``zeroed``: per BN, removed channels whose shift is zeroed as well as their scale (their
    constant reaches a conv through a per-sample gate or a padded pool, so it cannot be folded; a
    zero stays zero there); ``units``: per gate, the heads or neurons it keeps (removed first).
    """

    input_shape: list[int]
    keep: dict[str, list[int]]
    folds: dict[str, str] = field(default_factory=dict)
    selects: list[str] = field(default_factory=list)
    removed: dict[str, list[int]] = field(default_factory=dict)
    zeroed: dict[str, list[int]] = field(default_factory=dict)
    units: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "keep": self.keep, "folds": self.folds,
                "selects": list(self.selects), "removed": self.removed, "zeroed": self.zeroed, "units": self.units}

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        return cls(list(d["input_shape"]), {k: list(v) for k, v in d["keep"].items()}, dict(d["folds"]),
                   list(d["selects"]), {k: list(v) for k, v in d["removed"].items()},
                   {k: list(v) for k, v in d.get("zeroed", {}).items()},
                   {k: list(v) for k, v in d.get("units", {}).items()})

    def masked(self, model: nn.Module) -> nn.Module:
        """The masked dense network the pruned one equals: scales masked, and zeroed shifts zeroed."""
        return apply_mask(model, self.masks(model), self.zeroed)

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The effective keep-mask per BN and per gate of the dense ``model``."""
        sizes = ChannelIndex.of(model).layer_sizes()
        out = {}
        for name, kept in {**self.keep, **self.units}.items():
            mask = torch.zeros(sizes[name], dtype=torch.bool)
            mask[kept] = True
            out[name] = mask
        return out


def layer_masks(model: nn.Module, mask) -> dict[str, torch.Tensor]:
    """Per-layer keep masks from a flat mask over ``prunable_units(model)`` (or pass a dict through)."""
    index = ChannelIndex.of(model)
    if isinstance(mask, dict):
        sizes = index.layer_sizes()
        unknown = set(mask) - set(sizes)
        if unknown:
            raise PruneError(f"mask names layers the model does not have: {', '.join(sorted(unknown))}")
        for n, size in sizes.items():
            if n in mask and mask[n].numel() != size:
                raise PruneError(f"mask of layer '{n}' has {mask[n].numel()} entries, the layer {size}")
        return {n: mask[n].bool().cpu() for n in index.names if n in mask}
    if mask.numel() != index.total:
        raise PruneError(
            f"mask has {mask.numel()} entries but the model has {index.total} BN channels: "
            "was it computed on another architecture?"
        )
    return {n: piece.bool().cpu() for n, piece in index.split(mask).items()}


def apply_mask(model: nn.Module, mask, zeroed: dict[str, list[int]] | None = None) -> nn.Module:
    """A copy of ``model`` with the scale of every pruned channel (and the gate of every pruned head
    or neuron) set to zero (the masked net), and the shift too of the channels ``zeroed`` names (per
    BN, as a plan's ``zeroed``)."""
    masked = copy.deepcopy(model)
    layers = dict(prunable_units(masked))
    with torch.no_grad():
        for name, keep in layer_masks(masked, mask).items():
            layers[name].weight.mul_(keep.to(layers[name].weight))
        for name, channels in (zeroed or {}).items():
            layers[name].bias[channels] = 0
    return masked


# ----------------------------------------------------------------------------- the graph

def _graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                      customized_pruners=dict(CUSTOM_PRUNERS))
    except Exception as exc:  # noqa: BLE001 - whatever tracing a foreign model raises becomes one line
        raise PruneError(f"the pruning engine cannot trace this model's channels ({_first_line(exc)}): it has an "
                         "operation Torch-Pruning's graph does not follow") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:120]}" if lines else type(exc).__name__


def _group(dg: tp.DependencyGraph, module: nn.Module, fn, idxs: list[int], name: str):
    """Torch-Pruning's pruning group, its failures as a PruneError naming the layer."""
    try:
        return dg.get_pruning_group(module, fn, idxs)
    except Exception as exc:  # noqa: BLE001
        raise PruneError(f"the channels of '{name}' cannot be followed through the model ({_first_line(exc)}): it "
                         "splits, shuffles or slices them in a way the engine does not handle") from exc


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.out_channels and m.out_channels > 1


def _is_stream_op(m: nn.Module) -> bool:
    """A residual addition or a concatenation: where several producers share channels."""
    if isinstance(m, ops._ConcatOp):
        return True
    return isinstance(m, ops._ElementWiseOp) and str(m._grad_fn).lower().startswith(("add", "sub"))


def _check_supported(node, name: str | None, bn_name: str) -> None:
    """Refuse ops whose channels are not independent: pruning through them would not be exact."""
    module = node.module
    if isinstance(module, (ops._ConcatOp, ops._SplitOp, ops._ReshapeOp, ops._OutputOp, ops._SliceOp)):
        return
    if isinstance(module, ops._ElementWiseOp):
        if not node.inputs:
            return  # on a parameter's path (a linear weight's transpose), not on the data's
        op = str(module._grad_fn)
        if op.lower().startswith(_CHANNELWISE_OPS):
            return
        what = f"operation {op}"
    elif isinstance(module, _LAYERS):
        return
    elif isinstance(module, nn.Parameter):
        what = f"parameter '{name}' used outside a layer"
    else:
        what = f"layer '{name}' ({type(module).__name__})" if name else f"operation {type(module).__name__}"
    raise PruneError(f"{what} reads the channels of '{bn_name}' and is not supported by the pruning engine "
                     "(it mixes or moves channels): replace the operation, or leave that BN out of the mask "
                     "(prune_model takes a mask per layer)")


def _is_sliced_stream(node) -> bool:
    """A slice whose result meets other channels (ReXNet's ``x[:, :c] + shortcut``, then a concat):
    Torch-Pruning's index bookkeeping through it takes seconds per channel."""
    return any(isinstance(out.module, ops._ConcatOp) or _is_stream_op(out.module) for out in node.outputs)


def _check_indices(item, dg: tp.DependencyGraph, names: dict, bn_name: str) -> None:
    """Refuse a group whose channel numbers do not fit a layer it reaches: Torch-Pruning numbers the
    channels after a split (torch.split, chunk) as before it."""
    module = item.dep.target.module
    if not isinstance(module, _LAYERS) or not item.idxs:
        return
    out = dg.is_out_channel_pruning_fn(item.dep.handler)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        size = module.num_features
    elif isinstance(module, nn.Linear):
        size = module.out_features if out else module.in_features
    else:
        size = module.out_channels if out else module.in_channels
    if max(item.idxs) >= size:
        raise PruneError(f"the channels of '{bn_name}' reach layer '{names.get(module)}' through a split or slice "
                         "(torch.split, chunk) the pruning engine cannot follow: leave that BN out of the mask")


class _Classes:
    """Union-find over (bn name, channel): which BN channels are one channel of the network."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        root = x
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass
class _Coupling:
    sizes: dict[str, int]  # BN -> channels, for the BNs on the graph
    classes: _Classes
    streams: set  # class roots that pass through a residual add or a concatenation
    consumers: dict[str, dict[int, tuple]]  # conv/linear -> input index -> (bn, channel) it reads
    refused: dict[str, str] = field(default_factory=dict)  # BN -> why its channels cannot go (they all stay)
    pinned: set = field(default_factory=set)  # class roots that must stay (a grouped conv's lone group position)
    tied: set = field(default_factory=set)  # class roots tied across the groups of a grouped conv
    members: dict = field(default_factory=dict)  # class root -> its (bn, channel) members
    # BN -> the BNs its channels reach through channel-preserving ops, and whether they reach anything else
    reach: dict[str, tuple[set[str], bool]] = field(default_factory=dict)
    # BN -> conv/linear whose output channels go with its channels -> {BN channel: output channel}
    producers: dict[str, dict[str, dict[int, int]]] = field(default_factory=dict)
    readers: dict[frozenset, set[str]] = field(default_factory=dict)  # _private_readers' answers, by candidates
    roots: dict[tuple, tuple] = field(default_factory=dict)  # (bn, channel) -> its class root, once traced
    # selects -> (the model with them, its dependency graph, module names): _removal_plan's, the last few
    removal_graphs: dict[tuple, tuple] = field(default_factory=dict)
    # conv/linear -> input index -> what it reads there, over the BN channels (see _read_expr)
    reads: dict[str, dict[int, tuple]] = field(default_factory=dict)


# A model's coupling, traced once per structure (module types, tensor shapes, input shape): the
# prunable layers, the ties, the producers and every plan of one model share it.
_COUPLINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(model: nn.Module, example: torch.Tensor) -> tuple:
    return (tuple(example.shape[1:]), tuple((n, type(m)) for n, m in model.named_modules()),
            tuple((n, tuple(t.shape)) for n, t in model.state_dict().items()))


def _couple(model: nn.Module, example: torch.Tensor) -> _Coupling:
    key = _structure(model, example)
    cached = _COUPLINGS.get(model)
    if cached is None or cached[0] != key:
        cached = _COUPLINGS[model] = (key, _trace(model, example))
    return cached[1]


def _trace(model: nn.Module, example: torch.Tensor) -> _Coupling:
    dg = _graph(model, example)
    names = {m: n for n, m in model.named_modules()}
    names.update({p: n for n, p in model.named_parameters()})
    bns = {n: m for n, m in prunable_bns(model) if m in dg.module2node}
    bn_of = {m: n for n, m in bns.items()}
    coupling = _Coupling({n: m.weight.numel() for n, m in bns.items()}, _Classes(), set(), {})
    grouped_sides: dict[tuple[str, bool], dict[int, tuple]] = {}  # (grouped conv, output side?) -> index -> BN channel
    carriers: dict[str, dict] = {}  # BN -> graph node -> {BN channel: its indices at that node}
    for name, bn in bns.items():
        size = bn.weight.numel()
        fn = dg.get_pruner_of_module(bn).prune_out_channels
        try:
            # one channel first: Torch-Pruning takes time quadratic in a group's size, and the group of
            # all channels through an unsupported operation can take minutes; then all of them, since a
            # split sends different channels to different layers
            for item in _group(dg, bn, fn, [0], name):
                _check_supported(item.dep.target, names.get(item.dep.target.module), name)
                if isinstance(item.dep.target.module, ops._SliceOp) and _is_sliced_stream(item.dep.target):
                    raise PruneError(f"the channels of '{name}' reach a slice of a channel stream (x[:, a:b]) that is "
                                     "added to or concatenated with others, which the engine does not follow")
            group = _group(dg, bn, fn, list(range(size)), name)
            for item in group:
                _check_supported(item.dep.target, names.get(item.dep.target.module), name)
                _check_indices(item, dg, names, name)
        except PruneError as exc:  # this BN's channels stay; the others can still go
            coupling.refused[name] = str(exc)
            continue
        stream = False
        carried = carriers[name] = {}
        for item in group:
            module = item.dep.target.module
            at = carried.setdefault(item.dep.target, {})
            for i, r in zip(item.idxs, item.root_idxs):
                at.setdefault(r, set()).add(i)
            stream |= _is_stream_op(module)
            out = dg.is_out_channel_pruning_fn(item.dep.handler)
            if module in bn_of:
                for i, r in zip(item.idxs, item.root_idxs):
                    coupling.classes.union((name, r), (bn_of[module], i))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                side = coupling.producers.setdefault(name, {}) if out else coupling.consumers
                reads = side.setdefault(names[module], {})
                for i, r in zip(item.idxs, item.root_idxs):
                    if out:
                        reads[r] = i
                    else:
                        reads[i] = (name, r)
            if _is_grouped(module):
                sides = grouped_sides.setdefault((names[module], out), {})
                sides.update({i: (name, r) for i, r in zip(item.idxs, item.root_idxs)})
        if stream:
            coupling.streams.update(coupling.classes.find((name, c)) for c in range(size))
    _tie_groups(coupling, grouped_sides, model)
    memos: dict[str, dict] = {}
    for consumer, reads in coupling.consumers.items():
        node = dg.module2node[model.get_submodule(consumer)]
        coupling.reads[consumer] = {i: _read_expr(node, i, carriers[bn], r, bn_of, memos.setdefault(bn, {}))
                                    for i, (bn, r) in reads.items()}
    coupling.reach = {name: _reach(dg, bn, bn_of) if name not in coupling.refused else (set(), True)
                      for name, bn in bns.items()}
    # unions made after a class was marked may have moved its root
    for attr in ("streams", "pinned", "tied"):
        setattr(coupling, attr, {coupling.classes.find(c) for c in getattr(coupling, attr)})
    for name, size in coupling.sizes.items():
        for c in range(size):
            root = coupling.roots[(name, c)] = coupling.classes.find((name, c))
            coupling.members.setdefault(root, []).append((name, c))
    return coupling


def _tie_groups(coupling: _Coupling, sides: dict[tuple[str, bool], dict[int, tuple]], model: nn.Module) -> None:
    """A grouped conv keeps the same number of channels in every group: a channel position goes from
    all groups (input or output side) or from none, as Torch-Pruning removes them. Each position's
    channels become one class; a position some of whose channels are no BN's stays."""
    for (name, out), index in sides.items():
        conv = model.get_submodule(name)
        per = (conv.out_channels if out else conv.in_channels) // conv.groups
        for i, member in index.items():
            mates = [index.get(i % per + k * per) for k in range(conv.groups)]
            if any(m is None for m in mates):
                coupling.pinned.add(member)
                continue
            for mate in mates:
                coupling.classes.union(member, mate)
            coupling.tied.add(member)


def _is_grouped(m: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (those couple their inputs and outputs instead)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


def _reach(dg: tp.DependencyGraph, bn: nn.Module, bn_of: dict) -> tuple[set[str], bool]:
    """The BNs ``bn``'s output reaches with its channel numbering intact, and whether it also
    reaches anything else (a conv or linear, a concatenation, a reshape, the output)."""
    found: set[str] = set()
    todo, seen = list(dg.module2node[bn].outputs), set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        module = node.module
        if module in bn_of and module.num_features == bn.num_features:
            found.add(bn_of[module])
        elif ((isinstance(module, ops._ElementWiseOp) and str(module._grad_fn).lower().startswith(_CHANNELWISE_OPS))
              or (_is_depthwise(module) and module.in_channels == module.out_channels)) and node.outputs:
            todo.extend(node.outputs)
        else:
            return found, True
    return found, False


def _dead(coupling: _Coupling, masked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per BN, its kept channels whose every reader is a BN that masks them or another dead channel."""
    dead: dict[str, torch.Tensor] = {}

    def visit(name: str) -> torch.Tensor:
        if name not in dead:
            reached, escapes = coupling.reach[name]
            mask = torch.zeros_like(masked[name])
            if reached and not escapes:
                mask = torch.ones_like(mask)
                for other in reached:
                    mask &= ~masked[other] | visit(other)
            dead[name] = mask & masked[name]
        return dead[name]

    for name in masked:
        visit(name)
    return dead


# ----------------------------------------------------------------------------- what a removed channel carries

# A removed channel reaches each consumer as one of these, for every input, by the structure alone:
# VARYING (it depends on the input), CONSTANT (the same value everywhere, which folds), ZERO (a
# constant zero, which a per-sample gate or a zero-padded op passes unchanged).
VARYING, CONSTANT, ZERO = 0, 1, 2
_VARYING = ("varying",)
# channelwise functions f with f(0) = 0; constants stay constants through them (pooling included: a
# max pool pads with -inf, an adaptive or padding-free average pool only averages the constant)
_KEEP_ZERO = ("relu", "silu", "gelu", "tanh", "hardswish", "leakyrelu", "elu", "mish", "neg", "clone", "dropout",
              "tocopy", "alias", "maxpool", "adaptiveavgpool", "adaptivemaxpool", "mean", "upsample", "reflectionpad",
              "replicationpad")
_NONZERO = ("sigmoid", "hardsigmoid", "softplus")  # f(0) != 0: a zero becomes another constant


def _read_expr(consumer, i: int, carried: dict, r: int, bn_of: dict, memo: dict) -> tuple:
    """What ``consumer`` (a graph node) reads at input index ``i``, which carries channel ``r`` of
    the BN whose channel-to-node map is ``carried``: an expression over ``("source", bn, channel)``
    leaves, evaluated per plan by ``_Reads``. Built from the graph alone, so it holds for every
    input, unlike values seen on a batch."""
    return _all(tuple(_expr(node, j, carried, r, bn_of, memo) for node, j in _feeding(consumer, i, carried, r)))


def _all(kids: tuple) -> tuple:
    """``("all", kids)``, simplified: a single kid is itself, nested alls are one (the same answer)."""
    if not kids:
        return _VARYING
    if len(kids) == 1:
        return kids[0]
    return ("all", tuple(k for kid in kids for k in (kid[1] if kid[0] == "all" else (kid,))))


def _data_inputs(node) -> list:
    """The inputs of a graph node on the data's path: an op without inputs is on a parameter's (a
    linear weight's transpose)."""
    return [i for i in node.inputs if i.inputs or not isinstance(i.module, ops._ElementWiseOp)]


def _feeding(node, j: int, carried: dict, r: int) -> list[tuple]:
    """(input node, index) pairs that ``node``'s index ``j`` is computed from, among the inputs that
    carry channel ``r``: the same index where the input has it (channelwise ops, a conv's input),
    else wherever the input carries it (a flatten, split or slice renumbers channels)."""
    out = []
    for source in _data_inputs(node):
        at = carried.get(source, {}).get(r, ())
        out.extend([(source, j)] if j in at else [(source, k) for k in sorted(at)])
    return out


def _expr(node, j: int, carried: dict, r: int, bn_of: dict, memo: dict) -> tuple:
    """The expression of ``node``'s output at index ``j`` (see ``_read_expr``)."""
    key = (node, j)
    if key not in memo:
        module = node.module
        if module in bn_of:  # a BN of the class: its channel is the source (constant once masked)
            memo[key] = ("source", bn_of[module], j)
        elif isinstance(module, ops._ConcatOp):  # index j comes from one input, at j less its offset
            memo[key] = _concat_expr(node, j, carried, r, bn_of, memo)
        elif isinstance(module, (ops._SplitOp, ops._SliceOp, ops._ReshapeOp)):  # channels move, values do not
            memo[key] = _all(tuple(_expr(n, k, carried, r, bn_of, memo) for n, k in _feeding(node, j, carried, r)))
        elif isinstance(module, ops._ElementWiseOp):
            # an input that does not carry the channel (a gate of another shape) varies
            kids = tuple(_all(tuple(_expr(n, k, carried, r, bn_of, memo) for n, k in fed))
                         for fed in ([f for f in _feeding(node, j, carried, r) if f[0] is n] for n in _data_inputs(node)))
            memo[key] = _op_expr(node, kids) if kids else _VARYING
        else:  # a conv, a linear, anything else: computes from its whole input
            memo[key] = _VARYING
    return memo[key]


def _concat_expr(node, j: int, carried: dict, r: int, bn_of: dict, memo: dict) -> tuple:
    offsets, inputs = node.module.offsets, node.inputs
    if offsets is None or len(offsets) != len(inputs) + 1:  # no numbering: every input that carries the channel
        return _all(tuple(_expr(n, k, carried, r, bn_of, memo) for n, k in _feeding(node, j, carried, r)))
    for source, low, high in zip(inputs, offsets, offsets[1:]):
        if low <= j < high:
            k = j - low
            return _expr(source, k, carried, r, bn_of, memo) if k in carried.get(source, {}).get(r, ()) else _VARYING
    return _VARYING


def _op_expr(node, kids: tuple) -> tuple:
    """The expression of an elementwise graph node of ``kids``, by its autograd function (and the
    arguments it saved: an average pool's padding, a clamp's bounds)."""
    op = str(node.module._grad_fn).lower()
    fn = node.grad_fn
    if op.startswith(("add", "sub")):
        return _all(kids) if len(kids) > 1 else ("nonzero", kids)  # x + scalar: zero no more
    if op.startswith("mul"):
        return ("mul", kids) if len(kids) > 1 else kids[0]  # x * scalar keeps zero
    if op.startswith("div"):
        return kids[0] if len(kids) == 1 else ("nonzero", kids)  # x / scalar keeps zero
    if op.startswith(_KEEP_ZERO):
        return _all(kids)
    if op.startswith(("hardtanh", "clamp")):  # relu6 and friends: zero stays zero where the bounds hold it
        low = getattr(fn, "_saved_min_val", getattr(fn, "_saved_min", None))
        high = getattr(fn, "_saved_max_val", getattr(fn, "_saved_max", None))
        holds = (low is None or float(low) <= 0) and (high is None or float(high) >= 0)
        return _all(kids) if holds else ("nonzero", kids)
    if op.startswith("avgpool"):  # zero padding counted in the mean: a constant changes at the borders
        padded = any(getattr(fn, "_saved_padding", (1,))) and getattr(fn, "_saved_count_include_pad", True)
        return ("pad", kids) if padded else _all(kids)
    if op.startswith("constantpadnd"):  # autograd keeps no fill value: F.pad's zero, as "same" convs use
        return ("pad", kids)              # (another fill shows in _prune's cross-check and in _verify)
    if op.startswith(_NONZERO):
        return ("nonzero", kids)
    return _VARYING  # a batch norm outside its module, anything unknown


class _Reads:
    """Evaluates read expressions for one masked network: ``masked`` (BN -> keep mask) with the
    shifts of ``zeroed`` (BN -> channels) zeroed too. A source is VARYING where its BN keeps the
    channel; a masked channel emits its module's output at a zero scale (the shift, through an
    activation the module may hold), which does not depend on the input: ``outputs`` (shared by
    the evaluations of one plan) holds it per BN, computed once in float64."""

    def __init__(self, model: nn.Module, masked: dict[str, torch.Tensor], zeroed: dict[str, set[int]],
                 outputs: dict | None = None):
        self.model, self.zeroed = model, zeroed
        self.keep = {n: m.tolist() for n, m in masked.items()}
        self.outputs = {} if outputs is None else outputs
        self.memo: dict[int, int] = {}

    def source(self, bn: str, c: int) -> int:
        keep = self.keep.get(bn)
        if keep is None or keep[c]:  # a plan's masks name only the BNs that lose channels
            return VARYING
        if bn not in self.outputs:
            self.outputs[bn] = _zero_scale_outputs(self.model.get_submodule(bn))
        shifted, zero = self.outputs[bn]
        return ZERO if (zero if c in self.zeroed.get(bn, ()) else shifted)[c] == 0 else CONSTANT

    def __call__(self, expr: tuple) -> int:
        kind = expr[0]
        if kind == "source":
            return self.source(expr[1], expr[2])
        if kind == "varying":
            return VARYING
        state = self.memo.get(id(expr))
        if state is not None:
            return state
        states = [self(k) for k in expr[1]]
        if kind == "mul":  # zero times anything finite is zero
            state = ZERO if ZERO in states else VARYING if VARYING in states else CONSTANT
        elif VARYING in states:
            state = VARYING
        elif kind == "nonzero":
            state = CONSTANT
        elif kind == "pad":
            state = ZERO if all(t == ZERO for t in states) else VARYING
        else:  # "all"
            state = ZERO if all(t == ZERO for t in states) else CONSTANT
        self.memo[id(expr)] = state
        return state


@torch.no_grad()
def _zero_scale_outputs(bn: nn.Module) -> tuple[list[float], list[float]]:
    """What ``bn`` (with whatever its module applies after the normalization) emits per channel at
    a zero scale, with its shift and with a zero shift, in float64 (a BN works channel by channel,
    so all channels at once)."""
    module = copy.deepcopy(bn).double().eval()
    module.weight.zero_()
    spatial = 0 if isinstance(module, nn.BatchNorm1d) else 3 if isinstance(module, nn.BatchNorm3d) else 2
    x = torch.randn(2, bn.num_features, *([3] * spatial), dtype=torch.float64, device=module.weight.device)
    shifted = module(x)[0].reshape(bn.num_features, -1)[:, 0].tolist()
    module.bias.zero_()
    return shifted, module(x)[0].reshape(bn.num_features, -1)[:, 0].tolist()


@torch.no_grad()
def _probe(masked: nn.Module, example: torch.Tensor, wanted: dict[str, list[int]]):
    """Run ``masked`` once; per consumer, the value at each wanted input index and whether it is constant."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, idxs in wanted.items():
        def grab(module, inputs, name=name, idxs=idxs):
            seen[name] = inputs[0][:, idxs].detach().double()
        hooks.append(masked.get_submodule(name).register_forward_pre_hook(grab))
    probe_forward(masked, example, hooks)
    out = {}
    for name, x in seen.items():
        value = x[0].reshape(x.shape[1], -1)[:, 0]
        spread = (x - value.view(1, -1, *([1] * (x.dim() - 2)))).abs().flatten(2 if x.dim() > 2 else 1)
        spread = spread.amax(dim=(0, 2)) if x.dim() > 2 else spread.amax(dim=0)
        out[name] = (value, spread <= 1e-5 * (1 + value.abs()))
    return out


# ----------------------------------------------------------------------------- building a plan

def _convert(model: nn.Module, selects, folds: dict[str, str]) -> None:
    """Give ``model`` the select BNs (and convs) and fold slots of a plan (dense shapes, neutral values)."""
    for name in selects:
        module = model.get_submodule(name)
        _replace_module(model, name, SelectConv2d.from_conv(module) if isinstance(module, nn.Conv2d)
                        else SelectBatchNorm2d.from_bn(module))
    for name, kind in folds.items():
        module = model.get_submodule(name)
        if kind == "map" and not isinstance(module, ConstantFoldConv2d):
            _replace_module(model, name, ConstantFoldConv2d.from_conv(module))
        elif kind == "bias" and module.bias is None:
            out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            module.bias = nn.Parameter(torch.zeros(out, device=module.weight.device, dtype=module.weight.dtype))


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _private_readers(model: nn.Module, candidates: set[str], example: torch.Tensor) -> set[str]:
    """The candidate BNs whose outputs, once they select their inputs, reach nothing but consumers."""
    if not candidates:
        return set()
    trial = copy.deepcopy(model)
    _convert(trial, sorted(candidates), {})
    dg = _graph(trial, example)
    private = set()
    for name in candidates:
        sb = trial.get_submodule(name)
        group = dg.get_pruning_group(sb, dg.get_pruner_of_module(sb).prune_out_channels, list(range(sb.num_features)))
        def consumer_or_op(dep) -> bool:
            m = dep.target.module
            if not isinstance(m, _LAYERS):
                return True  # an activation, pooling, flatten ...
            return isinstance(m, (nn.Conv2d, nn.Linear)) and not _is_depthwise(m) and \
                not dg.is_out_channel_pruning_fn(dep.handler)

        if all(consumer_or_op(item.dep) for item in group if item.dep.target.module is not sb):
            private.add(name)
    return private


def _round_up(keep: torch.Tensor, scores: torch.Tensor, free: torch.Tensor, multiple: int) -> None:
    """Give back the most important ``free`` channels until the kept count is a multiple (in place)."""
    target = min(keep.numel(), math.ceil(int(keep.sum()) / multiple) * multiple)
    missing = target - int(keep.sum())
    candidates = torch.nonzero(~keep & free).flatten()
    if missing > 0 and len(candidates):
        best = candidates[torch.argsort(scores[candidates], descending=True, stable=True)[:missing]]
        keep[best] = True


def plan_pruning(model: nn.Module, mask, example_inputs: torch.Tensor, keep_streams: bool = False,
                 round_to: int = 1, strict: bool = True, refused: dict[str, str] | None = None,
                 scores: Mapping[str, torch.Tensor] | None = None) -> PrunePlan:
    """Decide what to remove for ``mask`` (see the module doc) and return it as a plan.

    A BN whose channels reach an operation the engine cannot prune through keeps them all: with
    ``strict``, a mask that removes some of them is a PruneError naming the operation; ``refused``
    (a dict) receives every such BN with the reason. ``scores`` (BN name -> channel importance,
    default |gamma|) ranks the channels ``round_to`` gives back. The units of gates are planned
    as the mask asks (every gate of the model is folded, those the mask leaves out keep all)."""
    requested = layer_masks(model, mask)
    for name, keep in requested.items():
        check_not_empty(name, keep)
    gated = dict(gates(model))
    if not gated:
        return _plan_channels(model, requested, example_inputs, keep_streams, round_to, strict, refused, scores)
    units = {}
    for n, g in gated.items():
        keep = requested[n].clone() if n in requested else torch.ones(g.weight.numel(), dtype=torch.bool)
        if g.kind == NEURON and round_to > 1:  # MLP widths as GEMMs like them; heads are whole already
            score = (scores or {}).get(n, g.weight.detach().abs().cpu())
            _round_up(keep, score.float(), torch.ones_like(keep), round_to)
        units[n] = keep.nonzero().flatten().tolist()
    channels = {n: keep for n, keep in requested.items() if n not in gated}
    plan = PrunePlan(list(example_inputs.shape[1:]), {})
    if prunable_bns(model):
        plain = prune_units(copy.deepcopy(model), units)
        plan = _plan_channels(plain, channels, example_inputs, keep_streams, round_to, strict, refused, scores)
    plan.units = units
    return plan


def _plan_channels(model: nn.Module, requested: dict[str, torch.Tensor], example_inputs: torch.Tensor,
                   keep_streams: bool, round_to: int, strict: bool, refused: dict[str, str] | None,
                   scores: Mapping[str, torch.Tensor] | None) -> PrunePlan:
    example = example_inputs[:1]
    was_training = model.training
    model.eval()
    try:
        coupling = _couple(model, example)
        if refused is not None:
            refused.update(coupling.refused)
        return _plan(model, requested, coupling, example_inputs, keep_streams, round_to, strict, scores or {})
    except EarlyBirdError:
        raise
    except Exception as exc:  # noqa: BLE001 - an engine failure on a foreign model is one line, never a traceback
        raise PruneError(f"the pruning engine failed on this model ({_first_line(exc)}): it has a structure the "
                         "engine does not handle") from exc
    finally:
        model.train(was_training)


def _plan(model: nn.Module, requested: dict[str, torch.Tensor], coupling: _Coupling, example_inputs: torch.Tensor,
          keep_streams: bool, round_to: int, strict: bool, scores: Mapping[str, torch.Tensor]) -> PrunePlan:
    example = example_inputs[:1]
    for name, why in coupling.refused.items():
        if strict and name in requested and not bool(requested[name].all()):
            raise PruneError(why)
    find = coupling.roots.__getitem__  # the classes are final once traced
    masked = {n: requested.get(n, torch.ones(s, dtype=torch.bool)) if n not in coupling.refused else
              torch.ones(s, dtype=torch.bool) for n, s in coupling.sizes.items()}

    # A class goes when all its BNs are masked (or dead) and every reader sees a constant.
    dead = _dead(coupling, masked)
    gone: dict = {}
    deciders: dict = {}  # class root -> the BNs that mask it
    for name, keep in masked.items():
        for c in range(keep.numel()):
            root = find((name, c))
            gone[root] = gone.get(root, True) and not bool(keep[c] and not dead[name][c])
            if not keep[c]:
                deciders.setdefault(root, []).append(name)
    if keep_streams:
        for root in coupling.streams:
            gone[root] = False
    for root in coupling.pinned:
        gone[root] = False
    # Readers must see a constant in the network prune_model compares with: the effective masks
    # (classes given back change what a gate computes), so decide again until that network agrees.
    read_masks, zeroed, outputs = masked, None, {}
    # each round only keeps more classes, so it ends: a RegNetY-16GF took 9 rounds, each block's
    # gates seeing what the rounds before gave back
    for _ in range(50):
        before = dict(gone)
        found = _constant_reads(model, read_masks, coupling, gone, outputs)
        if zeroed is not None and gone == before and found == zeroed:
            break
        zeroed = found
        effective, selects = _effective(model, masked, coupling, gone, deciders, example, round_to, scores)
        read_masks = effective
    else:
        raise PruneError("the pruning decisions do not settle: the model has a structure the engine does not handle")
    plan = _removal_plan(model, effective, gone, coupling, sorted(selects), example_inputs)
    plan.zeroed = {n: sorted(c for c in chans if not effective[n][c]) for n, chans in sorted(zeroed.items())}
    plan.zeroed = {n: chans for n, chans in plan.zeroed.items() if chans}
    return plan


def _effective(model: nn.Module, masked: dict[str, torch.Tensor], coupling: _Coupling, gone: dict, deciders: dict,
               example: torch.Tensor, round_to: int, scores: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Per BN the channels it keeps once classes are decided (``gone``, which --round-to may give
    back to), and the BNs that become selects."""
    find = coupling.roots.__getitem__  # the classes are final once traced

    # Masked channels of kept classes: readers select them away, other members keep them.
    def staying(name: str) -> torch.Tensor:  # per channel of a BN: does its class stay?
        return torch.tensor([not gone[find((name, c))] for c in range(coupling.sizes[name])], dtype=torch.bool)

    kept_class = {n: staying(n) for n in masked}
    bns = dict(prunable_bns(model))
    # a BN feeding a grouped conv does not select: its outputs must lose a position from every group
    tied = {bn for root in coupling.tied for bn, _ in coupling.members[root]}
    candidates = {n for n, k in masked.items() if bool((~k & kept_class[n]).any()) and type(bns[n]) is nn.BatchNorm2d
                  and n not in tied}
    key = frozenset(candidates)
    if key not in coupling.readers:  # the rounds of one plan often ask the same
        coupling.readers[key] = _private_readers(model, candidates, example)
    selects = coupling.readers[key]
    chosen = {}  # a select's kept channels: its own choice
    for name, keep in masked.items():
        rank = scores[name] if name in scores else bns[name].weight.detach().abs().float().cpu()
        if name in selects:
            chosen[name] = keep.clone()
            if round_to > 1:
                _round_up(chosen[name], rank, kept_class[name], round_to)
        elif round_to > 1:
            # Only channels this layer removes on its own come back: a class that no other BN masks.
            sole = torch.tensor([deciders.get(find((name, c))) == [name] for c in range(keep.numel())])
            eff = kept_class[name].clone()
            _round_up(eff, rank, ~kept_class[name] & sole, round_to)
            for c in torch.nonzero(eff & ~kept_class[name]).flatten().tolist():
                gone[find((name, c))] = False
    # every other BN keeps the classes that stay, given back or not
    effective = {name: chosen[name] if name in selects else staying(name) for name in masked}
    return effective, selects


def _constant_reads(model: nn.Module, masked: dict[str, torch.Tensor], coupling: _Coupling, gone: dict,
                    outputs: dict) -> dict[str, set[int]]:
    """Keep (in ``gone``) the classes some conv or linear reads as a varying value, except where
    zeroing their BN shifts too makes every read constant: a masked channel emits its shift through
    the activation, which a per-sample gate (squeeze-and-excitation) or a zero-padded average pool
    turns into a varying value; a zero passes both as a zero. Decided from the graph (``_Reads``),
    so it holds for every input (``outputs``: the BNs' zero-scale outputs, shared by a plan's
    rounds). The shift-zeroed channels, per BN."""
    find = coupling.roots.__getitem__  # the classes are final once traced
    reads = [(consumer, i, find(member)) for consumer, members in coupling.consumers.items()
             for i, member in members.items() if gone[find(member)]]

    def varying(zeroed: dict[str, set[int]]) -> set:
        state = _Reads(model, masked, zeroed, outputs)
        return {root for consumer, i, root in reads if state(coupling.reads[consumer][i]) == VARYING}

    def shifts_of(roots) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for root in roots:
            for bn, c in coupling.members[root]:
                out.setdefault(bn, set()).add(c)
        return out

    candidates = varying({})
    still = varying(shifts_of(candidates)) & candidates  # read as varying even as a zero: the class stays
    for root in still:
        gone[root] = False
    return shifts_of(candidates - still)


def prunable_layers(model: nn.Module, example_inputs: torch.Tensor, keep_streams: bool = False) -> list[str]:
    """The BNs whose channels the engine can remove, and the gates (all of them), in module order:
    masks are computed over these, so "p = 30%" means 30% of the channels that can really go.

    Found by planning the most extreme mask (every BN down to one channel): a BN that loses
    nothing even then (a stream member under ``keep_streams``, a stream a raw layer reads, a BN whose
    channels reach an operation the engine cannot prune through) never will. A PruneError naming
    such an operation where no BN is left.
    """
    gated = [n for n, _ in gates(model)]  # every gate's units can go
    if not prunable_bns(model):
        return gated
    plain = _plain(model)
    index = ChannelIndex.of(plain)
    extreme = {n: torch.arange(size) == 0 for n, size in zip(index.names, index.sizes)}
    refused: dict[str, str] = {}
    plan = plan_pruning(plain, extreme, example_inputs, keep_streams, strict=False, refused=refused)
    layers = [n for n in index.names if n in plan.keep]
    if not layers and not gated and refused:
        raise PruneError(next(iter(refused.values())))
    order = {n: i for i, (n, _) in enumerate(prunable_units(model))}
    return sorted(layers + gated, key=order.__getitem__)


def _plain(model: nn.Module) -> nn.Module:
    """``model`` without its gates (a copy with them folded in), for tracing its BN channels."""
    return prune_units(copy.deepcopy(model), {}) if gates(model) else model


def channel_ties(model: nn.Module, example_inputs: torch.Tensor) -> list[list[tuple[str, int]]]:
    """The BN channels that can only be removed together, as lists of (BN name, channel): one
    position in every group of a grouped (not depthwise) conv. Masks rank each list as one
    (``EarlyBird(ties=...)``), so that "p = 50%" removes whole positions rather than channels the
    engine would have to keep. Empty for models without grouped convs."""
    if not any(_is_grouped(m) for m in model.modules()):
        return []
    model = _plain(model)
    was_training = model.training
    try:
        coupling = _couple(model.eval(), example_inputs[:1])
    finally:
        model.train(was_training)
    return [sorted(coupling.members[root]) for root in sorted(coupling.tied, key=str)]


def channel_producers(model: nn.Module, example_inputs: torch.Tensor
                      ) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per BN, the convolutions and linear layers whose output channels go with its channels (the
    ones that produce them: several where convs add into a residual stream or are concatenated),
    as layer name -> (BN channels, that layer's output channels)."""
    model = _plain(model)
    was_training = model.training
    try:
        coupling = _couple(model.eval(), example_inputs[:1])
    finally:
        model.train(was_training)
    return {bn: {layer: (torch.tensor(list(pairs)), torch.tensor(list(pairs.values()))) for layer, pairs in convs.items()}
            for bn, convs in coupling.producers.items()}


def _removal_plan(model, effective, gone, coupling: _Coupling, selects: list[str], example_inputs) -> PrunePlan:
    """Trace what leaves each module for the decided classes and selects (dense numbering)."""
    find = coupling.roots.__getitem__  # the classes are final once traced
    key = tuple(selects)
    if key not in coupling.removal_graphs:  # plans of one model mostly share their selects (often none)
        if len(coupling.removal_graphs) >= 4:
            coupling.removal_graphs.pop(next(iter(coupling.removal_graphs)))
        trial = copy.deepcopy(model)
        _convert(trial, selects, {})
        coupling.removal_graphs[key] = trial, _graph(trial, example_inputs[:1]), {m: n for n, m in trial.named_modules()}
    trial, dg, names = coupling.removal_graphs[key]
    removed: dict[str, set[int]] = {}

    def add(group):
        for item in group:
            module = item.dep.target.module
            if module in names and isinstance(module, _LAYERS):
                side = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
                removed.setdefault(f"{names[module]}:{side}", set()).update(int(i) for i in item.idxs)

    # One member triggers a class: a plain BN by its outputs, a select BN by its inputs. A class tied
    # across a grouped conv's groups is several channels of the graph: members the first group did
    # not reach trigger in a next round, until every member is removed.
    classes = [coupling.members[root] for root in dict.fromkeys(
        find((name, c)) for name, size in coupling.sizes.items() for c in range(size)) if gone[root]]
    pending = [([m for m in members if m[0] not in selects] or members)[0] for members in classes]
    while pending:
        roots: dict[str, set[int]] = {}
        for bn, ch in pending:
            roots.setdefault(bn, set()).add(ch)
        for bn, chans in roots.items():
            module = trial.get_submodule(bn)
            pruner = dg.get_pruner_of_module(module)
            fn = pruner.prune_in_channels if bn in selects else pruner.prune_out_channels
            add(_group(dg, module, fn, sorted(chans), bn))
        left = [m for members in classes for m in members
                if m[0] not in selects and m[1] not in removed.get(f"{m[0]}:out", ())]
        pending = [] if set(left) & set(pending) else left  # no progress: the check below names the BN
    for bn in selects:
        drop = torch.nonzero(~effective[bn]).flatten().tolist()
        if drop:
            module = trial.get_submodule(bn)
            add(dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, drop))

    keep = {n: torch.nonzero(k).flatten().tolist() for n, k in effective.items() if not bool(k.all())}
    plan = PrunePlan(list(example_inputs.shape[1:]), keep, {}, selects,
                     {k: sorted(v) for k, v in sorted(removed.items())})
    for name, eff in effective.items():  # what the graph removes from each BN must be what the plan says
        got = set(range(coupling.sizes[name])) - set(removed.get(f"{name}:out", ()))
        if got != set(torch.nonzero(eff).flatten().tolist()):
            raise PruneError(f"the dependency graph removes other channels of '{name}' than planned: "
                             "the model has a structure the engine does not handle")
    return plan


# ----------------------------------------------------------------------------- applying a plan

def _execute(model: nn.Module, removed: dict[str, list[int]]) -> None:
    pruners = tp.DependencyGraph()  # only its table of layer pruners
    for layer_type, pruner in CUSTOM_PRUNERS.items():
        pruners.register_customized_layer(layer_type, pruner)

    def order(key):  # a select BN sheds its outputs before the stream it reads shrinks
        name, side = key.rsplit(":", 1)
        return isinstance(model.get_submodule(name), SelectBatchNorm2d) and side == "in"

    for key in sorted(removed, key=order):
        name, side = key.rsplit(":", 1)
        module = model.get_submodule(name)
        pruner = pruners.get_pruner_of_module(module)
        (pruner.prune_out_channels if side == "out" else pruner.prune_in_channels)(module, removed[key])


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Shrink a dense ``model`` in place to the architecture of ``plan`` (weights still to load)."""
    if plan.units:
        unit_shapes(model, plan.units)
    _convert(model, plan.selects, plan.folds)
    _execute(model, plan.removed)
    return model


def _fold_into(name: str, consumer: nn.Module, idxs: list[int], value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The fold of constant inputs ``value`` at ``idxs``: ("bias", vector) or ("map", kernel)."""
    w = consumer.weight.detach().double()
    if isinstance(consumer, nn.Linear):
        return "bias", w[:, idxs] @ value
    # a grouped conv: input channel i is position i % per of group i // per, and reaches that group's outputs only
    per_in, per_out = consumer.in_channels // consumer.groups, consumer.out_channels // consumer.groups
    kernel = torch.zeros(consumer.out_channels, *w.shape[2:], dtype=w.dtype)
    for i, v in zip(idxs, value.tolist()):
        group, pos = divmod(i, per_in)
        kernel[group * per_out:(group + 1) * per_out] += v * w[group * per_out:(group + 1) * per_out, pos]
    no_zero_padding = all(p == 0 for p in consumer.padding) or consumer.padding_mode != "zeros"
    if no_zero_padding:
        return "bias", kernel.sum(dim=(1, 2))
    return "map", kernel.unsqueeze(1)


def prune_model(model: nn.Module, mask, example_inputs: torch.Tensor, keep_streams: bool = False,
                round_to: int = 1, scores: Mapping[str, torch.Tensor] | None = None) -> tuple[nn.Module, PrunePlan]:
    """Return a physically smaller copy of ``model`` and its plan.

    ``mask`` is a flat keep-mask over ``prunable_bns(model)`` (as produced by
    :func:`earlybird.channel_masks` or the detector) or a dict BN name -> keep mask.
    ``example_inputs`` is one batch (a few samples) of the model's input. The result's outputs
    equal those of ``apply_mask(model, plan.masks(model))`` in eval mode, to float rounding;
    ``plan.masks`` is ``mask`` less the channels that coupling or ``round_to`` (keep a multiple
    of this many channels per layer) gave back, the most important first by ``scores`` (BN name ->
    channel importance; default |gamma|).
    """
    plan = plan_pruning(model, mask, example_inputs, keep_streams, round_to, scores=scores)
    with _one_line():
        return _prune(model, plan, example_inputs)


@contextlib.contextmanager
def _one_line():
    """As in plan_pruning: an engine failure on a foreign model is one PruneError, never a traceback."""
    try:
        yield
    except EarlyBirdError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PruneError(f"the pruning engine failed on this model ({_first_line(exc)}): it has a structure the "
                         "engine does not handle") from exc


def _prune(model: nn.Module, plan: PrunePlan, example_inputs: torch.Tensor) -> tuple[nn.Module, PrunePlan]:
    if not plan.units:
        return _prune_channels(model, plan, example_inputs)
    pruned = prune_units(copy.deepcopy(model), plan.units)
    if plan.keep:  # the channels, planned on the network the units left
        channels = dataclasses.replace(plan, units={})
        pruned, _ = _prune_channels(pruned, channels, example_inputs)
        plan.folds = channels.folds
    example = example_inputs.to(next(model.parameters()).device).double()
    _verify(copy.deepcopy(pruned).double(), plan.masked(model).double(), example, 1e-5, other_inputs(example))
    return pruned, plan


def _prune_channels(model: nn.Module, plan: PrunePlan, example_inputs: torch.Tensor) -> tuple[nn.Module, PrunePlan]:
    folds, exact, example = _folds(model, plan, example_inputs)
    plan.folds = {name: kind for name, (kind, _) in folds.items()}
    # the engine's exactness, apart from rounding to the model's number format: a float64 build of
    # the plan against the float64 masked network, on the example and on inputs of other statistics
    built = _build(model, plan, folds, torch.float64)
    _verify(built, exact, example.double(), 1e-6, other_inputs(example.double()))
    formats = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    # in the model's number format: each folded bias rounded once, from its exact sum
    return (built.to(formats.pop()) if len(formats) == 1 else _build(model, plan, folds)), plan


def _folds(model: nn.Module, plan: PrunePlan, example_inputs: torch.Tensor):
    """(consumer -> (fold kind, float64 value), the float64 masked network, the example on the
    model's device): what each conv or linear gets for the removed channels it reads."""
    exact = plan.masked(model).double()  # the masked network in float64: the values to fold, the reference
    consumers = {}
    dense = dict(model.named_modules())
    for key, idxs in plan.removed.items():
        name, side = key.rsplit(":", 1)
        if side == "in" and isinstance(dense[name], (nn.Conv2d, nn.Linear)):
            consumers[name] = idxs
    example = example_inputs.to(next(model.parameters()).device)
    coupling = _couple(model, example_inputs[:1])  # traced when the plan was made
    state = _Reads(model, plan.masks(model), {n: set(c) for n, c in plan.zeroed.items()})
    # the probe's spread only cross-checks the structure's answer, it never decides
    probe = _probe(exact, example.double(), consumers)
    folds = {}
    for name, idxs in consumers.items():
        reads = coupling.reads.get(name, {})
        if any(i not in reads or state(reads[i]) == VARYING for i in idxs):
            raise PruneError(f"removed channels do not reach layer '{name}' as constants, so they cannot be "
                             "removed exactly: the model has a structure the engine does not handle")
        value, constant = probe[name]
        if not bool(constant.all()):
            raise PruneError(f"removed channels reach layer '{name}' as values that vary where the model's structure "
                             "says they are constant: the model has an operation the engine does not handle")
        if bool(value.any()):  # zeros (a ReLU after a non-positive shift) add nothing: the layer stays plain
            folds[name] = _fold_into(name, dense[name], idxs, value)
    return folds, exact, example


def pruned_architecture(model: nn.Module, mask, example_inputs: torch.Tensor, keep_streams: bool = False,
                        round_to: int = 1, scores: Mapping[str, torch.Tensor] | None = None,
                        folds: bool = True) -> nn.Module:
    """The network ``prune_model`` would return, for counting its MACs and parameters: the same
    layers and shapes, the fold biases included (``folds=False`` leaves them out: they add
    parameters, never MACs), without copying the weights' folds in or checking the result. A
    fraction of ``prune_model``'s time, for searches over many candidate masks (budget targets)."""
    plan = plan_pruning(model, mask, example_inputs, keep_streams, round_to, scores=scores)
    with _one_line():
        if folds and plan.removed:
            plain = prune_units(copy.deepcopy(model), plan.units) if plan.units else model
            channels = dataclasses.replace(plan, units={})
            plan.folds = {name: kind for name, (kind, _) in _folds(plain, channels, example_inputs[:1])[0].items()}
        return apply_plan(shapes_only(model), plan)


def shapes_only(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device: its layers and
    shapes without its data (a forward computes shapes only, which counting MACs needs)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _build(model: nn.Module, plan: PrunePlan, folds: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """A pruned copy of ``model`` (in ``dtype``): select BNs and fold slots, the folds (computed in
    float64) added to the dense consumers, then the channels removed, which slices the biases and
    fold kernels along with the consumers' own output channels."""
    pruned = copy.deepcopy(model) if dtype is None else copy.deepcopy(model).to(dtype)
    _convert(pruned, plan.selects, plan.folds)
    with torch.no_grad():
        for name, (kind, value) in folds.items():
            module = pruned.get_submodule(name)
            target = module.bias if kind == "bias" else module.fold_kernel
            target.add_(value.to(target))
    _execute(pruned, plan.removed)
    return pruned


def other_inputs(example: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """Inputs of other statistics than ``example``, of its shape (at least two samples): scaled and
    shifted noise, and smooth images (low-frequency noise); a value folded as a constant that is not
    one (a gate saturated on the planning batch) shows on them."""
    g = torch.Generator().manual_seed(seed)
    shape = (max(2, example.shape[0]), *example.shape[1:])
    out = [2 * torch.randn(shape, generator=g) + 1]
    if example.dim() == 4 and min(example.shape[2:]) > 1:
        coarse = torch.randn(shape[0], shape[1], 4, 4, generator=g) * 2
        out.append(nn.functional.interpolate(coarse, size=tuple(example.shape[2:]), mode="bilinear",
                                             align_corners=False))
    return [x.to(example) for x in out]


@torch.no_grad()
def _verify(pruned: nn.Module, masked: nn.Module, example: torch.Tensor, tolerance: float,
            others: list[torch.Tensor] = ()) -> None:
    """The last line of defence: an op the graph misread shows up as a different output, on the
    planning batch or on inputs of other statistics (``others``), all in one batch."""
    was = pruned.training, masked.training
    pruned.eval(), masked.eval()
    try:
        batches = (example, *others)
        x = torch.cat(batches)
        want, got = masked(x), pruned(x)
        want, got = (t[0] if isinstance(t, (tuple, list)) else t for t in (want, got))
        start = 0
        for batch in batches:
            part = slice(start, start + len(batch))
            start += len(batch)
            diff = (got[part].double() - want[part].double()).abs().max().item()
            if not diff <= tolerance * (1 + want[part].abs().max().item()):
                raise PruneError(f"the pruned network differs from the masked one by {diff:.3g}"
                                 f"{'' if batch is example else ' on inputs unlike the example batch'}: the model has "
                                 "an operation the pruning engine does not handle")
    finally:
        pruned.train(was[0]), masked.train(was[1])
