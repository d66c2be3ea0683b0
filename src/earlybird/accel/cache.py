"""Speed choices remembered per machine, torch version and model shape.

Timing the settings (memory format, autocast type) and each convolution's GEMM parts takes 20-40 s
on a CPU before the first step; the answer depends only on the CPU, the torch build, the threads,
the network's layers and the batch, so it is kept in the user's cache directory
(``$EARLYBIRD_CACHE_DIR``, else ``$XDG_CACHE_HOME/earlybird``, else ``~/.cache/earlybird``) and a
second run of the same network starts at once. Delete the file to time again. A cache that cannot
be read or written is ignored: it only saves time.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch
from torch import nn

from ..config import RuntimeConfig
from ..errors import WriteError
from ..files import atomic_write, user_cache_dir

FILE = "speed-choices.json"
MAX_ENTRIES = 256  # the oldest go first
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "sve")


def cache_file() -> Path:
    return user_cache_dir() / FILE


def _cpu() -> list:
    """The CPU's model name and the vector extensions that decide which kernel is fastest."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [platform.processor() or platform.machine()]
    fields = {}
    for line in info.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return [fields.get("model name") or fields.get("CPU part") or platform.machine(), sorted(flags & set(CPU_FLAGS)),
            os.cpu_count()]


def choice_key(model: nn.Module, input_shape, num_classes: int, batch_size: int, rt: RuntimeConfig,
               low_precision_active: bool) -> str:
    """What a choice depends on: the machine, torch, the threads, every layer (type and shape), the
    input, the batch and the flags that say what may be timed."""
    layers = [(name, type(m).__name__, m.extra_repr()) for name, m in model.named_modules()
              if not list(m.children())]
    parts = [_cpu(), torch.__version__, torch.get_num_threads(), layers, list(input_shape), num_classes, batch_size,
             rt.channels_last, rt.amp, rt.amp_dtype, rt.compile, low_precision_active]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def _entries(path: Path) -> tuple[dict, str]:
    """The stored entries, and why a file there could not be read ('' where it could, or is absent)."""
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, ""
    except (OSError, ValueError) as exc:  # garbage bytes: a UnicodeDecodeError, a ValueError too
        return {}, type(exc).__name__
    return (entries, "") if isinstance(entries, dict) else ({}, "not a JSON object")


def recall(key: str, say=None) -> dict | None:
    """The speed entry (``setting_to_dict``'s) stored for ``key``, if any; ``say`` gets one line when
    the file cannot be read (the settings are timed again, and ``remember`` rewrites it)."""
    entries, damaged = _entries(cache_file())
    if damaged and say is not None:
        say(f"the speed-choice cache {cache_file()} could not be read ({damaged}): timing the settings again, and "
            "the file is rewritten")
    entry = entries.get(key)
    return entry if isinstance(entry, dict) and "channels_last" in entry and "autocast" in entry else None


def remember(key: str, entry: dict) -> None:
    path = cache_file()
    entries = _entries(path)[0]
    entries.pop(key, None)
    entries[key] = entry
    text = json.dumps(dict(list(entries.items())[-MAX_ENTRIES:])).encode()
    try:
        atomic_write(path, lambda f: f.write(text), len(text))
    except WriteError:
        pass  # a read-only or full home: the next run times again
