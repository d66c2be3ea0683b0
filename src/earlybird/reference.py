"""Import checkpoints of the reference implementation: ``earlybird import-reference``.

They are pickles (keys ``state_dict``, ``cfg``, ``epoch``, ``best_prec1``; weights often under a
``module.`` prefix) that may hold arbitrary objects, so they are unpickled in full here, and only
here, after a warning. VGG (dense or pruned) and the dense PreResNet / ResNet of the reference are
renamed to earlybird's layers and written as an earlybird checkpoint (tensors and plain values).
A pruned reference VGG keeps its compacted weights: its plan keeps the first ``cfg`` channels of
every layer.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .models import ModelSpec, create_model
from .prune import apply_plan, plan_pruning

DENSE_ONLY = ("preresnet", "resnet")


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


def import_reference(obj: dict, spec: ModelSpec, source: str = "reference"):
    """(model, plan or None, state dict) of a reference checkpoint's network in earlybird's layout."""
    state = {}
    for key, value in obj["state_dict"].items():
        new = _rename(spec.arch, key)
        if new is not None:
            state[new] = value
    dense = create_model(spec)
    expected = dense.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CheckpointError(f"{source} has layers {spec.describe()} lacks ({', '.join(unknown[:3])} ...): pass the "
                              "--arch, --depth and --dataset it was trained with")
    pruned = {n for n in expected if n in state and state[n].shape != expected[n].shape}
    plan = None
    if pruned:
        if spec.arch in DENSE_ONLY:
            raise CheckpointError(f"{source} is a pruned {spec.arch}: earlybird imports the reference's dense "
                                  f"{spec.arch} checkpoints only; import its EB ticket and prune it with earlybird")
        bns = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
        widths = {n: state[f"{n}.weight"].shape[0] for n in bns}
        mask = {n: torch.arange(m.num_features) < widths[n] for n, m in dense.named_modules() if n in widths}
        example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
        plan = plan_pruning(dense, mask, example)
        dense = apply_plan(dense, plan)
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
