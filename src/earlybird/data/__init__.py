"""Datasets: readers of the official file formats, and a fast in-memory batch loader."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .cifar import load_cifar
from .fashion_mnist import load_fashion_mnist
from .imagenet import FolderSplit, class_folders, load_imagenet
from .loader import BatchLoader, FolderLoader
from .transforms import FILTERS, InputTransform


@dataclass(frozen=True)
class DatasetInfo:
    """Shape of the inputs and the standard augmentation of one dataset."""

    name: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # random crop after zero padding by this many pixels (0: none)
    flip: bool  # random horizontal flips


_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 3, 10, 32, _CIFAR_MEAN, _CIFAR_STD, 4, True),
    "cifar100": DatasetInfo("cifar100", 3, 100, 32, _CIFAR_MEAN, _CIFAR_STD, 4, True),
    # Flips only: Fashion-MNIST items are centred, and a crop costs accuracy in short schedules.
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 10, 28, (0.2860,), (0.3530,), 0, True),
    # Decoded and augmented per image by workers (random-resized crop, flip): see data.imagenet.
    "imagenet": DatasetInfo("imagenet", 3, 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0, True),
}


@dataclass
class Dataset:
    info: DatasetInfo
    train_images: torch.Tensor  # uint8, N x C x H x W
    train_labels: torch.Tensor  # int64, N
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class FolderDataset:
    """A dataset too large for memory: file lists, decoded by a FolderLoader's workers."""

    info: DatasetInfo
    train: FolderSplit
    test: FolderSplit
    classes: list[str]


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """The dataset's shapes; for ImageNet the class count is that of ``root/train`` when it exists."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if name == "imagenet" and root is not None and class_folders(Path(root) / "train"):
        info = replace(info, num_classes=len(class_folders(Path(root) / "train")))
    return info


def load_dataset(name: str, root: str | Path = "data", download: bool = True, train_subset: int | None = None,
                 seed: int = 0) -> Dataset | FolderDataset:
    """Read (or fetch) a dataset; ``train_subset`` keeps a seeded random subset of the training set."""
    info = dataset_info(name, root)
    root = Path(root)
    if name == "imagenet":
        train, test, classes = load_imagenet(root)
        if train_subset is not None:
            if not 0 < train_subset <= len(train.paths):
                raise ConfigError(f"--train-subset {train_subset} must be in 1..{len(train.paths)}")
            keep = torch.randperm(len(train.paths), generator=torch.Generator().manual_seed(seed))[:train_subset]
            train = FolderSplit([train.paths[i] for i in keep], [train.labels[i] for i in keep])
        return FolderDataset(info, train, test, classes)
    if name == "fashion-mnist":
        (xtr, ytr), (xte, yte) = load_fashion_mnist(root, download)
    else:
        (xtr, ytr), (xte, yte) = load_cifar(name, root, download)
    if xtr.shape[1:] != (info.in_channels, info.image_size, info.image_size):
        raise DataError(f"{name} images have shape {tuple(xtr.shape[1:])}, expected "
                        f"{(info.in_channels, info.image_size, info.image_size)}")
    if len(xtr) == 0 or len(xte) == 0:
        raise DataError(f"{name} in {root} has an empty training or test split")
    if train_subset is not None:
        if not 0 < train_subset <= len(xtr):
            raise ConfigError(f"--train-subset {train_subset} must be in 1..{len(xtr)}")
        keep = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:train_subset]
        xtr, ytr = xtr[keep], ytr[keep]
    return Dataset(info, xtr, ytr, xte, yte)


__all__ = ["BatchLoader", "DATASETS", "FILTERS", "InputTransform", "Dataset", "DatasetInfo", "FolderDataset", "FolderLoader", "dataset_info",
           "load_dataset"]
