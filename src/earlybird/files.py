"""Files earlybird writes: whole or not at all, and a failed write is one line.

A file is written to a temporary file in its own folder, flushed to disk and renamed over the old
one, so a crash or a full disk never leaves half a file and never harms the previous version. A
write that fails (disk full, quota, I/O error; torch.save reports these as a RuntimeError raised
while handling the OSError) becomes a :class:`WriteError` naming the file, the system's reason, the
space the file needs and the space left.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .errors import WriteError


def user_cache_dir() -> Path:
    """Where earlybird keeps what only saves time (speed choices, decoded images): ``$EARLYBIRD_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/earlybird``, else ``~/.cache/earlybird``."""
    root = os.environ.get("EARLYBIRD_CACHE_DIR")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "earlybird"


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or what it was raised from or while handling), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_error(path: Path, error: OSError, needed: int) -> WriteError:
    return WriteError(path, error.strerror or str(error), needed, free_bytes(path.parent))


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (dicts, lists, tuples): what a checkpoint of it needs, about."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], needed: int) -> Path:
    """Write ``path`` with ``write(file)`` via a temporary file and a rename; ``needed``: its size,
    about, for the message if it fails. Nothing is left behind on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc, needed) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        error = os_error(exc)
        if error is None:
            raise
        os.unlink(tmp)  # before measuring the space left
        raise write_error(path, error, needed) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def append_line(path: Path, line: str) -> None:
    """Append one line; a failed append is cut back off, so no half line is left for a rerun to follow."""
    data = (line + "\n").encode()
    try:
        f = open(path, "ab")
    except OSError as exc:
        raise write_error(path, exc, len(data)) from None
    with f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
        except OSError as exc:
            try:
                f.truncate(start)
            except OSError:
                pass
            raise write_error(path, exc, len(data)) from None
