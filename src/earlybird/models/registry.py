"""Model registry: an architecture name -> a builder taking a :class:`ModelSpec`.

A checkpoint stores the spec (plain values), so any saved model is rebuilt by name; no pickled
modules. New architectures register with :func:`register_model`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from torch import nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[["ModelSpec"], nn.Module]] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an (unpruned) network."""

    arch: str = "vgg"
    depth: int = 16
    width: float = 1.0
    in_channels: int = 3
    num_classes: int = 10
    image_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**d)

    def describe(self) -> str:
        width = "" if self.width == 1 else f" width {self.width:g}"
        return f"{self.arch}{self.depth}{width} ({self.in_channels}x{self.image_size}x{self.image_size} -> {self.num_classes})"


def register_model(name: str):
    """Decorator: register ``fn(spec) -> nn.Module`` under ``name``."""

    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(spec: ModelSpec) -> nn.Module:
    """Build the network that ``spec`` names; unknown names give a ConfigError listing the known ones."""
    if spec.arch not in _REGISTRY:
        raise ConfigError(f"unknown architecture '{spec.arch}': choose one of {', '.join(available_models())}")
    if not spec.width > 0:
        raise ConfigError(f"--width {spec.width:g} must be positive")
    return _REGISTRY[spec.arch](spec)
