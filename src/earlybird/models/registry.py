"""Model registry: an architecture name -> a builder taking a :class:`ModelSpec`.

A checkpoint stores the spec (plain values), so any saved model is rebuilt by name; no pickled
modules. New architectures register with :func:`register_model`. Besides the registered names,
``module:function`` builds a user's model (``function(num_classes=..., in_channels=...)``), and
``torchvision:NAME`` / ``timm:NAME`` build those libraries' models where they are installed.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[["ModelSpec"], nn.Module]] = {}
_DEPTHS: dict[str, tuple[int, ...] | None] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an (unpruned) network."""

    arch: str = "vgg"
    depth: int = 16
    width: float = 1.0
    in_channels: int = 3
    num_classes: int = 10
    image_size: int = 32
    # (name, value) pairs the builder of a timm:, torchvision: or module:function model takes besides
    kwargs: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{**d, "kwargs": tuple(tuple(kv) for kv in d.get("kwargs", ()))})

    def describe(self) -> str:
        width = "" if self.width == 1 else f" width {self.width:g}"
        depth = self.depth if _DEPTHS.get(self.arch) else ""
        extra = "".join(f" {k}={v!r}" for k, v in self.kwargs)
        return (f"{self.arch}{depth}{width}{extra} ({self.in_channels}x{self.image_size}x{self.image_size} -> "
                f"{self.num_classes})")


def register_model(name: str, depths: tuple[int, ...] | None = None):
    """Decorator: register ``fn(spec) -> nn.Module`` under ``name``; ``depths`` lists the usual
    depths of an architecture that has a depth (``resnet`` + 18 may then be written ``resnet18``)."""

    def wrap(fn):
        _REGISTRY[name] = fn
        _DEPTHS[name] = tuple(depths) if depths else None
        return fn

    return wrap


def available_models() -> list[str]:
    return [f"{n} (--depth {', '.join(map(str, _DEPTHS[n]))})" if _DEPTHS[n] else n for n in sorted(_REGISTRY)] + [
        "module:function (your own model)", "torchvision:NAME", "timm:NAME"]


# the reference scripts' names for the standard ResNet-50 (dense and pruned)
ALIASES = {"resnet50_official": "resnet50", "resnet50_prune": "resnet50"}


def resolve_arch(arch: str, depth: int) -> tuple[str, int]:
    """``resnet18`` -> (``resnet``, 18); an architecture without a depth gets depth 0."""
    arch = ALIASES.get(arch, arch)
    match = re.fullmatch(r"([a-z_]+?)(\d+)", arch)
    if arch not in _REGISTRY and match and _DEPTHS.get(match.group(1)):
        return match.group(1), int(match.group(2))
    return arch, depth if _DEPTHS.get(arch) else 0


def init_weights(model: nn.Module, bn_scale: float) -> None:
    """He init for convs, small normal for linears, BN scales at ``bn_scale`` (network slimming uses
    0.5: the scale its L1 strength --s was tuned for)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, bn_scale)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _external(spec: ModelSpec) -> nn.Module:
    source, _, name = spec.arch.partition(":")
    if spec.width != 1:
        raise ConfigError(f"--width applies to the built-in architectures only, not to {spec.arch}: drop --width")
    size = {}  # the data's input size, for the models that take one (a ViT's position embeddings)
    if source == "torchvision":
        if spec.in_channels != 3:
            raise ConfigError(f"torchvision models take 3 input channels, the dataset has {spec.in_channels}")
        source, builder = "torchvision.models", "get_model"  # torchvision itself has no get_model
        kwargs, size = {"name": name, "weights": None, "num_classes": spec.num_classes}, {"image_size": spec.image_size}
    elif source == "timm":
        builder, kwargs = "create_model", {"model_name": name, "num_classes": spec.num_classes,
                                           "in_chans": spec.in_channels, "pretrained": False}
        size = {"img_size": spec.image_size}
    else:
        builder, kwargs = name, {"num_classes": spec.num_classes, "in_channels": spec.in_channels}
    try:
        fn = getattr(importlib.import_module(source), builder)
    except (ImportError, AttributeError, RuntimeError) as exc:  # RuntimeError: a build for another torch
        raise ConfigError(f"cannot load --arch {spec.arch} ({exc}): install it, or check the module:function name "
                          "(the module must be importable, e.g. from the current directory)") from None
    extra = dict(spec.kwargs)
    size = {k: v for k, v in size.items() if k not in extra}
    try:
        try:
            model = fn(**kwargs, **size, **extra)
        except TypeError as exc:
            if not any(k in str(exc) for k in size):
                raise
            model = fn(**kwargs, **extra)  # a network of any input size (a CNN) takes none
    except TypeError as exc:
        given = ", ".join(f"{k}=" for k in (*kwargs, *extra) if k not in ("name", "model_name"))
        raise ConfigError(f"--arch {spec.arch}: {exc} (it is called with {given})") from None
    except (ValueError, RuntimeError, KeyError) as exc:  # torchvision's and timm's "unknown model"
        raise ConfigError(f"--arch {spec.arch}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}: "
                          "check the model name") from None
    except Exception as exc:  # noqa: BLE001 - the builder's own failure, most often on arguments that do not fit
        given = " ".join(f"{k}={v!r}" for k, v in extra.items())
        raise ConfigError(f"--arch {spec.arch} fails to build ({type(exc).__name__}: {exc})"
                          + (f" with --model-kwargs {given}: check that they fit together" if extra else "")) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--arch {spec.arch} returned a {type(model).__name__}, not a torch.nn.Module")
    _check_output(model, spec)
    return model


def _check_output(model: nn.Module, spec: ModelSpec) -> None:
    """A foreign model must map the dataset's images to one score per class."""
    x = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:  # whatever a user's forward raises on our input shape
        raise ConfigError(f"--arch {spec.arch} fails on {spec.in_channels}x{spec.image_size}x{spec.image_size} "
                          f"inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"--arch {spec.arch} returns {shape} for a batch of 2, not (2, {spec.num_classes}): "
                          "it must honour num_classes")


def create_model(spec: ModelSpec) -> nn.Module:
    """Build the network that ``spec`` names; unknown names give a ConfigError listing the known ones."""
    if not spec.width > 0:
        raise ConfigError(f"--width {spec.width:g} must be positive")
    if ":" in spec.arch:
        return _external(spec)
    if spec.kwargs:
        raise ConfigError(f"--model-kwargs go to the builders of timm:, torchvision: and module:function models, not "
                          f"to the built-in {spec.arch}: use --depth and --width")
    if spec.arch not in _REGISTRY:
        raise ConfigError(f"unknown architecture '{spec.arch}': choose one of {', '.join(sorted(_REGISTRY))}, "
                          "or module:function for your own model")
    return _REGISTRY[spec.arch](spec)
