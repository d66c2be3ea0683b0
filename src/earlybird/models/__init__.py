"""Model zoo: importing this package registers every built-in architecture."""
from . import densenet, mobilenet, resnet, vgg  # noqa: F401  (register themselves)
from .registry import ModelSpec, available_models, create_model, register_model, resolve_arch

__all__ = ["ModelSpec", "available_models", "create_model", "register_model", "resolve_arch"]
