"""CIFAR-10 / CIFAR-100 in the official python-pickle layout.

``cifar-10-batches-py/data_batch_1..5, test_batch`` (labels under b"labels") and
``cifar-100-python/train, test`` (fine labels under b"fine_labels"); each holds b"data", a
uint8 array N x 3072 (channel-major 32x32 images).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .download import download, extract_tar

_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Loads only dicts, lists, strings and numpy arrays: a foreign pickle cannot run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path} is not a readable CIFAR batch ({exc}): delete it and download the dataset again") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path} has data of shape {data.shape} and {len(labels)} labels; expected N x 3072 and N labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}: is it the other CIFAR?")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar(name: str, root: Path, download_ok: bool = True):
    folder, train_files, test_files, label_key, num_classes = LAYOUT[name]
    base = root / folder
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        url, md5 = _ARCHIVES[name]
        hint = f"put the extracted '{folder}/' folder from {url} under {root} (or pass --data DIR)"
        if not download_ok:
            raise DataError(f"{base} lacks {', '.join(missing)}: {hint}")
        archive = download(url, root / url.rsplit("/", 1)[1], md5, hint)
        extract_tar(archive, root)

    def read(files):
        parts = [_read_batch(base / f, label_key, num_classes) for f in files]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return read(train_files), read(test_files)
