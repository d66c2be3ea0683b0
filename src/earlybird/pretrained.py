"""Starting weights: ``--weights FILE`` (``load_pretrained``) for any --arch, and ``--pretrained``
(``library_weights``): the file timm or torchvision keeps in its own cache for a ``timm:`` or
``torchvision:`` model, found there without a request.

A file is a state dict (``.pth``/``.pt``/``.bin`` read without unpickling objects, or
``.safetensors``), a checkpoint dict holding one (timm's ``state_dict``/``model``, torchvision's plain
state dict) or an unpruned earlybird checkpoint; a ``module.`` prefix (DataParallel, DDP) is
dropped. Every tensor of the network whose name and shape match is loaded. The classifier (the last
linear layer) is left new where the dataset has another number of classes, and the first
convolution is adapted where the data has other input channels, as timm does for ``in_chans``:
summed over the file's channels for one channel, else its channels repeated and scaled. A vision
transformer's position embeddings (timm's ``pos_embed``, torchvision's ``pos_embedding``) built
for another image size are resampled to the network's grid of patches, bicubic, the class and other
prefix tokens kept, as timm does when it loads weights at another ``img_size``. Any other
difference means the file is of another network, and the first names that differ are the error.
"""
from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .gates import gates

HOLDERS = ("state_dict", "model", "state_dict_ema", "model_ema")  # where checkpoints keep their weights
POSITIONS = ("pos_embed", "pos_embedding")  # timm's and torchvision's ViT position embeddings


@dataclass
class Loaded:
    """What ``load_pretrained`` did with each of the network's tensors."""

    loaded: list[str] = field(default_factory=list)
    # the first conv to the data's input channels, position embeddings to its image size
    adapted: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # the classifier, for the data's classes

    def describe(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.adapted:
            parts.append(f"adapted {', '.join(self.adapted)}")
        if self.new:
            parts.append(f"left {', '.join(self.new)} new for the classes")
        return ", ".join(parts)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict a weights file holds (see the module doc); every failure is one line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"--weights {path} does not exist: check the path")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"--weights {path} needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a damaged file of any kind is one line
            raise CheckpointError(f"--weights {path} cannot be read as safetensors ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"--weights {path} holds Python objects besides tensors, which earlybird does not "
                              "unpickle: save its state_dict() (torch.save(model.state_dict(), ...))") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(f"--weights {path} is not a weights file torch can read ({type(exc).__name__})") from None
    if isinstance(obj, dict) and obj.get("format") == "earlybird-checkpoint" and obj.get("plan"):
        raise CheckpointError(f"--weights {path} is a pruned earlybird checkpoint: retrain it (earlybird retrain "
                              "--model) instead of starting a search from it")
    holder = next((k for k in HOLDERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
    state = obj[holder] if holder else obj
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--weights {path} holds no state dict (a name -> tensor mapping, or one under "
                              f"{' / '.join(HOLDERS)})")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def library_weights(arch: str) -> Path:
    """The cached pretrained weights of a ``timm:NAME`` or ``torchvision:NAME`` model (timm's on
    the Hugging Face cache, torchvision's in torch.hub's directory); a miss is one line saying where
    the file belongs and how to put it there."""
    source, _, name = arch.partition(":")
    if source == "torchvision":
        import torch.hub
        import torchvision

        try:
            url = torchvision.models.get_model_weights(name).DEFAULT.url
        except (ValueError, KeyError, AttributeError):
            raise ConfigError(f"--pretrained: torchvision has no pretrained weights for {name}") from None
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if path.is_file():
            return path
        raise CheckpointError(f"--pretrained: torchvision's weights for {name} are not in its cache ({path}): "
                              f"download {url} there where the network reaches, or pass --weights FILE")
    if source == "timm":
        import huggingface_hub
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            raise ConfigError(f"--pretrained: timm has no pretrained weights on the Hugging Face Hub for {name}")
        cache = huggingface_hub.constants.HF_HUB_CACHE
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
        raise CheckpointError(f"--pretrained: timm's weights for {name} ({repo}) are not in the Hugging Face cache "
                              f"({cache}): run timm.create_model('{name}', pretrained=True) once where the network "
                              "reaches, or pass --weights FILE")
    raise ConfigError(f"--pretrained applies to timm:NAME and torchvision:NAME models, not to {arch}: pass the file "
                      "with --weights FILE")


def _adapt_input(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first conv's weight for ``channels`` inputs (timm's rule for in_chans)."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = math.ceil(channels / weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :channels] * (weight.shape[1] / channels)


def _grid(tokens: int, prefix: int) -> int | None:
    """The side of the square grid of patches behind ``tokens`` position embeddings with ``prefix``
    class (and distillation or register) tokens before them, or None."""
    side = math.isqrt(tokens - prefix) if tokens > prefix else 0
    return side if side and side * side == tokens - prefix else None


def _resample_positions(theirs: torch.Tensor, tokens: int, owner: nn.Module) -> tuple[torch.Tensor, str] | None:
    """Position embeddings (1, prefix + side^2, dim) resampled to ``tokens``: (tensor, what was done),
    or None where the counts are not square grids behind the same prefix. The prefix is what the
    embeddings' ``owner`` says (timm's ``num_prefix_tokens``, none with ``no_embed_class``), else
    the fewest tokens that leave both grids square (torchvision's class token)."""
    said = 0 if getattr(owner, "no_embed_class", False) else getattr(owner, "num_prefix_tokens", None)
    prefix = next((p for p in ([said] if isinstance(said, int) else range(9))
                   if _grid(theirs.shape[1], p) and _grid(tokens, p)), None)
    if prefix is None:
        return None
    old, new = _grid(theirs.shape[1], prefix), _grid(tokens, prefix)
    grid = theirs[:, prefix:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=new < old)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(theirs.dtype)
    return torch.cat([theirs[:, :prefix], grid], 1), f"{old}x{old} -> {new}x{new} patches"


def load_pretrained(model: nn.Module, source: str | Path | dict) -> Loaded:
    """Load the weights of ``source`` (a file, or a state dict) into ``model``, in place."""
    state = read_weights(source) if not isinstance(source, dict) else source
    own = model.state_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    classifier = {f"{linears[-1]}.weight", f"{linears[-1]}.bias"} if linears else set()
    stem = f"{convs[0]}.weight" if convs else None
    done, taken, differ = Loaded(), {}, []
    ours = {f"{name}.weight" for name, _ in gates(model)}  # earlybird's gates: ones unless the file has them
    for key, value in own.items():
        theirs = state.get(key)
        if theirs is None:
            if not key.endswith("num_batches_tracked") and key not in ours:
                differ.append(f"{key} (missing from the file)")
        elif theirs.shape == value.shape:
            taken[key] = theirs
            done.loaded.append(key)
        elif key in classifier and theirs.shape[1:] == value.shape[1:]:
            done.new.append(key)
        elif key == stem and theirs.dim() == 4 and (theirs.shape[0], *theirs.shape[2:]) == (value.shape[0],
                                                                                            *value.shape[2:]):
            taken[key] = _adapt_input(theirs, value.shape[1])
            done.adapted.append(f"{key} ({theirs.shape[1]} -> {value.shape[1]} input channels)")
        elif key.split(".")[-1] in POSITIONS and theirs.dim() == value.dim() == 3 and theirs.shape[::2] == \
                value.shape[::2] and (resampled := _resample_positions(
                    theirs, value.shape[1], model.get_submodule(key.rpartition(".")[0]))):
            taken[key] = resampled[0]
            done.adapted.append(f"{key} ({resampled[1]})")
        else:
            differ.append(f"{key} (file {tuple(theirs.shape)}, network {tuple(value.shape)})")
    differ += [f"{key} (not in the network)" for key in state if key not in own]
    if differ:
        where = source if not isinstance(source, dict) else "the weights"
        raise CheckpointError(f"--weights {where} is of another network: {', '.join(differ[:3])}"
                              f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}; pass weights of the "
                              "same --arch, --depth and --width")
    model.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in taken.items()}})
    return done
