"""Checksummed downloads of official dataset files (for users who have a network)."""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import DataError


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, hint: str, timeout: float = 30.0) -> Path:
    """Fetch ``url`` to ``dest`` (atomically) and check its MD5; on failure say where to put the file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while block := response.read(1 << 20):
                out.write(block)
        got = md5sum(Path(tmp))
        if got != md5:
            raise DataError(f"download of {url} has MD5 {got}, expected {md5}: retry, or {hint}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise DataError(f"could not download {url} ({getattr(exc, 'reason', exc)}): {hint}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def extract_tar(archive: Path, into: Path) -> None:
    """Unpack a downloaded archive, refusing members that would land outside ``into``."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
