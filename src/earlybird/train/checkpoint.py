"""Checkpoints: tensors and plain values only, written atomically, read with weights_only=True.

A checkpoint names its architecture (a ModelSpec) and, for a pruned network, its PrunePlan, so
the model is rebuilt from code: no pickled modules, nothing that breaks when classes move.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, EarlyBirdError
from ..files import atomic_write, tensor_bytes
from ..gates import attach_gates
from ..models import ModelSpec, create_model
from ..prune import PrunePlan, apply_plan
from .distributed import is_main

FORMAT = "earlybird-checkpoint"
VERSION = 1
KINDS = ("search", "ticket", "pruned", "retrain", "imported", "swa")


def plain(value, where: str = "checkpoint"):
    """``value`` as what a weights-only load reads: tensors, Python numbers, strings, None, and
    lists/tuples/dicts of them. A NumPy scalar (the reference's ``best_prec1`` is ``np.round`` of
    a float64) becomes its Python number; anything else is a bug of the writer, named by ``where``."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:  # np.float64 is a float too
        return value.item()
    if value is None or isinstance(value, torch.Tensor) or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds tensors and plain values only")


def save_checkpoint(path: str | Path, kind: str, spec: ModelSpec, model: nn.Module, plan: PrunePlan | None = None,
                    **extra) -> Path:
    """Write a checkpoint via a temporary file and a rename, so a crash never leaves half a file (a
    failed write is a WriteError and the previous checkpoint stays)."""
    assert kind in KINDS
    path = Path(path)
    if not is_main():  # one writer: rank 0
        return path
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "spec": spec.to_dict(),
        "plan": plan.to_dict() if plan else None,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **plain(extra),  # checked before writing: a file earlybird writes, earlybird must load
    }
    return atomic_write(path, lambda f: torch.save(payload, f), tensor_bytes(payload))


def load_checkpoint(path: str | Path, kinds: tuple[str, ...] = KINDS) -> dict:
    """Read and validate a checkpoint; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (EB tickets are saved as EB-<percent>-<epoch>.pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as exc:
        text = str(exc).strip()
        if "weights only load failed" in text.lower():
            raise CheckpointError(f"{path} holds Python objects that would run code when loaded, so it was refused "
                                  "(earlybird loads only tensors and plain values); if it is a reference-implementation "
                                  "checkpoint you trust, convert it with `earlybird import-reference`") from None
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason[:120]}): re-create it or pick another file") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ("a reference-implementation checkpoint: convert it with `earlybird import-reference`"
                if isinstance(ckpt, dict) and "state_dict" in ckpt else "checkpoints of other tools cannot be read")
        raise CheckpointError(f"{path} is not an earlybird checkpoint (no '{FORMAT}' marker): {hint}")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer earlybird (format {ckpt['version']}): upgrade earlybird")
    if ckpt.get("kind") not in kinds:
        want = " or ".join(kinds)
        raise CheckpointError(f"{path} is a '{ckpt.get('kind')}' checkpoint, but a {want} checkpoint is needed here")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> tuple[nn.Module, ModelSpec, PrunePlan | None]:
    """Rebuild the (possibly pruned) network a checkpoint describes and load its weights."""
    try:
        spec = ModelSpec.from_dict(ckpt["spec"])
        plan = PrunePlan.from_dict(ckpt["plan"]) if ckpt.get("plan") else None
        model = create_model(spec)
        if plan:
            apply_plan(model, plan)
        elif ckpt.get("gates"):  # a search's dense network carries its gates
            attach_gates(model)
    except EarlyBirdError:
        raise
    except Exception as exc:  # a damaged spec or plan, not a bug of ours
        raise CheckpointError(f"{path} describes a model that cannot be built ({exc}): re-create the checkpoint") from None
    load_weights(model, ckpt["state_dict"], path)
    return model, spec, plan


def load_weights(model: nn.Module, state_dict: dict, path: str | Path = "checkpoint") -> None:
    """load_state_dict with a one-line error when the weights belong to another architecture."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path} holds weights of another architecture ({first[:160]}): "
                              "pass the --arch/--depth/--width it was trained with") from None
