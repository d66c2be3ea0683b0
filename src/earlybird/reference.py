"""Import checkpoints of the reference implementation: ``earlybird import-reference``.

They are pickles (keys ``state_dict``, ``cfg``, ``epoch``, ``best_prec1``; weights often under a
``module.`` prefix) that may hold arbitrary objects, so they are unpickled in full here, and only
here, after a warning. VGG (dense or pruned) and the dense PreResNet / ResNet of the reference are
renamed to earlybird's layers and written as an earlybird checkpoint (tensors and plain values).
A pruned reference VGG keeps its compacted weights: its plan keeps the first ``cfg`` channels of
every layer. A pruned reference PreResNet (``resprune.py``) keeps its streams at full width; its
``channel_selection`` vectors say which stream channels each block's bn1 and the final bn pass on,
which earlybird's select-BNs gather (the BN's other channels are dropped), and its other BNs are
compacted like VGG's.

The pruned ImageNet ResNets of the reference import too. ResNet-18/34 (``resprune.py``,
``resnet_imagenet.resnet18(cfg)``) keep their streams whole; each block's ``channel_selection``
picks the stream channels its conv1 reads, which earlybird's conv1 gathers as a select conv, and bn1
is compacted. ResNet-50
(``hand_resnet50.resnet50_prune(cfg)``) prunes its stem and streams too: every BN keeps its first
``cfg`` channels, and the bias of its downsample convolutions (earlybird's have none) moves into the
BN after them. ``--scratch`` (the architecture file, ``pruned.pth.tar``) and ``--resume`` (the
weights, ``model_best.pth.tar``) are read together as the reference's EVAL scripts read them.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .models import ModelSpec, create_model
from .prune import apply_plan, plan_pruning

BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


def _rename(arch: str, key: str) -> str | None:
    key = key.removeprefix("module.")
    if key.endswith("indexes"):  # the reference's channel_selection layers: earlybird selects in its BNs
        return None
    if arch == "vgg" and key.startswith("feature."):
        return "features." + key[len("feature."):]
    if arch == "preresnet":
        return key.replace("downsample.0.", "downsample.")
    return key


def read_reference(path: str | Path) -> dict:
    """Unpickle a reference checkpoint in full (this can run code stored in the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"reference checkpoint {path} does not exist: check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, AttributeError,
            ModuleNotFoundError) as exc:
        raise CheckpointError(f"{path} cannot be read as a reference checkpoint ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ''})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    raise CheckpointError(f"{path} holds no 'state_dict': it is not a checkpoint of the reference implementation")


def read_pair(scratch: str | Path | None, resume: str | Path | None) -> dict:
    """One reference checkpoint from the EVAL scripts' pair: the architecture (``cfg``) of
    ``scratch`` with the weights of ``resume``; either alone is the checkpoint it holds."""
    arch, weights = (read_reference(p) if p else None for p in (scratch, resume))
    if arch is None or weights is None:
        return arch or weights
    theirs, ours = _shapes(arch["state_dict"]), _shapes(weights["state_dict"])
    different = sorted(k for k in set(theirs) & set(ours) if theirs[k] != ours[k]) or sorted(set(theirs) ^ set(ours))
    if different:
        raise CheckpointError(f"{scratch} and {resume} hold different networks ({different[0]}: "
                              f"{theirs.get(different[0])} and {ours.get(different[0])}): pass the weights retrained "
                              "from that pruned network")
    return {**weights, "cfg": arch.get("cfg", weights.get("cfg"))}


def _shapes(state: dict) -> dict[str, tuple]:
    """Parameter name (prefix and batch counters left out) -> shape, and each selection's count."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.endswith("indexes"):
            out[key] = (int((value != 0).sum()),)
        elif not key.endswith("num_batches_tracked"):
            out[key] = tuple(value.shape)
    return out


def _block_inputs(dense: torch.nn.Module) -> dict[str, int]:
    """Block name -> the stream width its conv1 reads, for the ImageNet ResNets' blocks."""
    return {name: m.conv1.in_channels for name, m in dense.named_modules() if hasattr(m, "conv1") and
            hasattr(m, "downsample")}


def _check_cfg(cfg, dense: torch.nn.Module, state: dict, selections: dict, source: str) -> None:
    """A pruned ImageNet ResNet's ``cfg`` against its weights: resnet18/34 holds [channels the block
    reads, its conv1's outputs] per block and one unused entry; resnet50_prune [stem, stem] + [conv1,
    conv2, conv3 outputs] per block, conv3's counting where a stage starts (its stream width)."""
    blocks = list(_block_inputs(dense))
    three = hasattr(dense.get_submodule(blocks[0]), "conv3")
    size = 2 + 3 * len(blocks) if three else 1 + 2 * len(blocks)
    if len(cfg) != size:
        raise CheckpointError(f"{source} has a cfg of {len(cfg)} widths; a pruned "
                              f"{'resnet50_prune' if three else 'ImageNet resnet'} of {len(blocks)} blocks has "
                              f"{size}: pass the --depth it was built with")
    found = [(cfg[0], state["conv1.weight"].shape[0], "conv1")] if three else []
    for i, block in enumerate(blocks):
        if three:  # conv3's entry counts where a stage starts: the later blocks' conv3 write that width
            found += [(cfg[2 + 3 * i], state[f"{block}.conv1.weight"].shape[0], f"{block}.conv1"),
                      (cfg[3 + 3 * i], state[f"{block}.conv2.weight"].shape[0], f"{block}.conv2")]
            if block.endswith(".0"):
                found.append((cfg[4 + 3 * i], state[f"{block}.conv3.weight"].shape[0], f"{block}.conv3"))
        else:  # the last entry is unused
            if selections.get(block) is not None:
                found.append((cfg[2 * i], int((selections[block] != 0).sum()), f"{block}.select"))
            found.append((cfg[2 * i + 1], state[f"{block}.conv1.weight"].shape[0], f"{block}.conv1"))
    for want, got, where in found:
        if int(want) != int(got):
            raise CheckpointError(f"{source}: its cfg says {want} channels at {where}, its weights and selections "
                                  f"{got}: the cfg and the weights are of different networks")


def _resnet_reads(dense: torch.nn.Module, state: dict, selections: dict, source: str) -> dict[str, torch.Tensor]:
    """Per block of a pruned ImageNet ResNet-18/34 whose selection skips stream channels: the
    channels its conv1 reads (it becomes a select conv gathering them, at their MACs)."""
    inputs, reads = _block_inputs(dense), {}
    for block, chosen in selections.items():
        if block not in inputs:  # the stem's selection, after its BN: it must pass every channel on
            if block == "" and bool((chosen != 0).all()):
                continue
            raise CheckpointError(f"{source} selects channels at '{block or 'the stem'}', where the reference's "
                                  "ResNet passes them all: the checkpoint does not fit --arch resnet")
        weight, width = state.get(f"{block}.conv1.weight"), inputs[block]
        if weight is None:
            continue  # a checkpoint without it is refused as not fitting, below
        picked = torch.nonzero(chosen).flatten()
        if chosen.numel() != width or picked.numel() != weight.shape[1]:
            raise CheckpointError(f"{source}: {block}'s selection picks {picked.numel()} of {chosen.numel()} channels "
                                  f"and its conv1 reads {weight.shape[1]} of {width}: the selections and the weights "
                                  "are of different networks")
        if picked.numel() < width:
            reads[f"{block}.conv1"] = picked
    return reads


def _fold_downsample_bias(state: dict) -> None:
    """resnet50_official/_prune's downsample convs have a bias; earlybird's, followed by a BN, have
    none: a constant added before a BN is its running mean less that constant (batch statistics
    cancel it in training)."""
    for key in [k for k in state if k.endswith("downsample.0.bias")]:
        bn = key[:-len("0.bias")] + "1"
        state[f"{bn}.running_mean"] = state[f"{bn}.running_mean"] - state.pop(key)


def classes_of(obj: dict) -> int | None:
    """The class count of a reference checkpoint's classifier (``fc``), where it has one."""
    for key, value in obj["state_dict"].items():
        if key.removeprefix("module.") == "fc.weight":
            return int(value.shape[0])
    return None


def _selected(arch: str, key: str) -> str | None:
    """The BN whose channels a reference ``channel_selection`` (``key``: its ``indexes``) passes on:
    a PreResNet block's bn1, or the final bn."""
    key = key.removeprefix("module.")
    if arch != "preresnet" or not key.endswith("select.indexes"):
        return None
    parent = key[:-len("select.indexes")]
    return parent + "bn1" if parent else "bn"


def _masks(dense: torch.nn.Module, state: dict, selections: dict) -> dict[str, torch.Tensor]:
    """Per BN the channels the reference kept: a selection's nonzero entries, else the first as many
    as its compacted weights hold."""
    masks = {}
    for name, m in dense.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d) and f"{name}.weight" in state:
            chosen = selections.get(name)
            masks[name] = (chosen != 0 if chosen is not None and chosen.numel() == m.num_features
                           else torch.arange(m.num_features) < state[f"{name}.weight"].shape[0])
    return masks


def _prune_like_reference(dense: torch.nn.Module, spec: ModelSpec, state: dict, selections: dict,
                          reads: dict[str, torch.Tensor]):
    """(pruned model, plan) with the reference's widths; ``state``'s full-width selected BNs are cut
    to the channels they pass on; ``reads``: convs that gather the stream channels listed."""
    masks = _masks(dense, state, selections)
    with torch.no_grad():  # a dropped channel adds nothing in the reference: no constant to fold
        for name, keep in masks.items():
            dense.get_submodule(name).bias[~keep] = 0
    # a random input: on zeros every channel looks constant, and the engine would remove what conv reads raw
    example = torch.randn(2, spec.in_channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    plan = plan_pruning(dense, masks, example, keep_streams=spec.arch == "preresnet")
    for name, picked in reads.items():
        width = dense.get_submodule(name).in_channels
        plan.selects.append(name)
        plan.removed[f"{name}:in"] = sorted(set(range(width)) - set(picked.tolist()))
        state[f"{name}.index"] = picked
    pruned = apply_plan(dense, plan)
    for name in (n for n in plan.selects if n not in reads):  # the select BNs
        kept = torch.tensor(plan.keep[name])
        for p in BN_PARAMS:
            if state[f"{name}.{p}"].shape[0] == masks[name].numel():
                state[f"{name}.{p}"] = state[f"{name}.{p}"][kept]
        state[f"{name}.index"] = pruned.get_submodule(name).index
    return pruned, plan


def import_reference(obj: dict, spec: ModelSpec, source: str = "reference"):
    """(model, plan or None) of a reference checkpoint's network in earlybird's layout."""
    state, selections, block_selects, reads = {}, {}, {}, {}
    for key, value in obj["state_dict"].items():
        new, bn = _rename(spec.arch, key), _selected(spec.arch, key)
        if new is not None:
            state[new] = value
        elif bn is not None:
            selections[bn] = value.detach().flatten()
        elif spec.arch == "resnet" and key.endswith("select.indexes"):  # a block's, or the stem's
            block_selects[key.removeprefix("module.")[:-len("select.indexes")].rstrip(".")] = value.detach().flatten()
    dense = create_model(spec)
    if spec.arch == "resnet":
        _fold_downsample_bias(state)
        if obj.get("cfg") is not None:
            try:
                _check_cfg(obj["cfg"], dense, state, block_selects, source)
            except KeyError as exc:
                raise CheckpointError(f"{source} has no {exc.args[0]}: pass the --arch and --depth it was built "
                                      "with") from None
        reads = _resnet_reads(dense, state, block_selects, source)
    expected = dense.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CheckpointError(f"{source} has layers {spec.describe()} lacks ({', '.join(unknown[:3])} ...): pass the "
                              "--arch, --depth and --dataset it was trained with")
    pruned = {n for n in expected if n in state and state[n].shape != expected[n].shape}
    plan = None
    if pruned or reads or any(not bool((s != 0).all()) for s in selections.values()):
        dense, plan = _prune_like_reference(dense, spec, state, selections, reads)
        expected = dense.state_dict()
    for name, value in expected.items():  # pruned reference copies leave the BN batch counters out
        if name.endswith("num_batches_tracked"):
            state.setdefault(name, torch.zeros_like(value))
    try:
        dense.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        raise CheckpointError(f"{source} does not fit {spec.describe()} ({(lines[1] if len(lines) > 1 else lines[0]).strip()[:160]}): "
                              "pass the --arch, --depth, --width and --dataset it was trained with") from None
    return dense, plan
