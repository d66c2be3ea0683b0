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
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .models import ModelSpec, create_model
from .prune import apply_plan, plan_pruning

DENSE_ONLY = ("resnet",)
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


def _prune_like_reference(dense: torch.nn.Module, spec: ModelSpec, state: dict, selections: dict):
    """(pruned model, plan) with the reference's widths; ``state``'s full-width selected BNs are cut
    to the channels they pass on."""
    masks = _masks(dense, state, selections)
    with torch.no_grad():  # a dropped channel adds nothing in the reference: no constant to fold
        for name, keep in masks.items():
            dense.get_submodule(name).bias[~keep] = 0
    # a random input: on zeros every channel looks constant, and the engine would remove what conv reads raw
    example = torch.randn(2, spec.in_channels, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    plan = plan_pruning(dense, masks, example, keep_streams=spec.arch == "preresnet")
    pruned = apply_plan(dense, plan)
    for name in plan.selects:
        kept = torch.tensor(plan.keep[name])
        for p in BN_PARAMS:
            if state[f"{name}.{p}"].shape[0] == masks[name].numel():
                state[f"{name}.{p}"] = state[f"{name}.{p}"][kept]
        state[f"{name}.index"] = pruned.get_submodule(name).index
    return pruned, plan


def import_reference(obj: dict, spec: ModelSpec, source: str = "reference"):
    """(model, plan or None) of a reference checkpoint's network in earlybird's layout."""
    state, selections = {}, {}
    for key, value in obj["state_dict"].items():
        new, bn = _rename(spec.arch, key), _selected(spec.arch, key)
        if new is not None:
            state[new] = value
        elif bn is not None:
            selections[bn] = value.detach().flatten()
    dense = create_model(spec)
    expected = dense.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CheckpointError(f"{source} has layers {spec.describe()} lacks ({', '.join(unknown[:3])} ...): pass the "
                              "--arch, --depth and --dataset it was trained with")
    pruned = {n for n in expected if n in state and state[n].shape != expected[n].shape}
    plan = None
    if pruned or any(not bool((s != 0).all()) for s in selections.values()):
        if spec.arch in DENSE_ONLY:
            raise CheckpointError(f"{source} is a pruned {spec.arch}: earlybird imports the reference's dense "
                                  f"{spec.arch} checkpoints only; import its EB ticket and prune it with earlybird")
        dense, plan = _prune_like_reference(dense, spec, state, selections)
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
