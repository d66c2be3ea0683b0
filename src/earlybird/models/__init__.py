"""Model zoo: importing this package registers every built-in architecture."""
from . import vgg  # noqa: F401  (registers "vgg")
from .registry import ModelSpec, available_models, create_model, register_model

__all__ = ["ModelSpec", "available_models", "create_model", "register_model"]
