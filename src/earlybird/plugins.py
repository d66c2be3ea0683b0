"""Name -> class registries of the method's seams (``importance.IMPORTANCES``, ``rules.RULES``)."""
from __future__ import annotations

from .errors import ConfigError


def pick(value, registry: dict[str, type], base: type, flag: str):
    """``value`` if it is already a ``base`` object, else a new object of the class registered under it."""
    if isinstance(value, base):
        return value
    if value not in registry:
        raise ConfigError(f"unknown {flag} '{value}': choose one of {', '.join(registry)}")
    return registry[value]()
