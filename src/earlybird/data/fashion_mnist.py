"""Fashion-MNIST from its gzipped IDX files.

Looked up in ``--data`` (directly or under ``fashion-mnist/``), then where Debian's
``dataset-fashion-mnist`` package installs it, then downloaded (checksummed) into ``--data``.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .download import download

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83fd310"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be read ({exc}): delete it and fetch the dataset again") from None
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} ends inside its header ({len(raw)} bytes): the file is truncated; delete it and "
                        "fetch the dataset again")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path} declares shape {dims} but holds {len(body)} bytes: the file is truncated")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(root: Path, download_ok: bool) -> dict[str, Path]:
    hint = f"put the four *-ubyte.gz files from {_URL} in {root / 'fashion-mnist'} (or apt-get install dataset-fashion-mnist)"
    partial = None
    for folder in (root, root / "fashion-mnist", SYSTEM_DIR):
        paths = {k: folder / name for k, (name, _) in FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
        if partial is None and folder != SYSTEM_DIR and any(p.is_file() for p in paths.values()):
            partial = paths
    if partial is not None:  # a folder with some of the files: fetch (or name) just the missing ones
        missing = {k: p for k, p in partial.items() if not p.is_file()}
        if not download_ok:
            raise DataError(f"{next(iter(partial.values())).parent} lacks {', '.join(p.name for p in missing.values())} "
                            f"of Fashion-MNIST's four files: put {'it' if len(missing) == 1 else 'them'} there (from "
                            f"{_URL}), or drop --no-download to fetch {'it' if len(missing) == 1 else 'them'}")
        for k, p in missing.items():
            download(_URL + p.name, p, FILES[k][1], hint)
        return partial
    if not download_ok:
        raise DataError(f"Fashion-MNIST not found in {root} or {SYSTEM_DIR}: {hint}")
    target = root / "fashion-mnist"
    return {k: download(_URL + name, target / name, md5, hint) for k, (name, md5) in FILES.items()}


def load_fashion_mnist(root: Path, download_ok: bool = True):
    paths = _find(root, download_ok)

    def split(images_key, labels_key):
        images, labels = read_idx(paths[images_key]), read_idx(paths[labels_key])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{paths[images_key]} and {paths[labels_key]} do not match (shapes {images.shape}, {labels.shape})")
        if len(labels) and labels.max() > 9:
            raise DataError(f"{paths[labels_key]} has labels above 9: not Fashion-MNIST")
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

    return split("train_images", "train_labels"), split("test_images", "test_labels")
