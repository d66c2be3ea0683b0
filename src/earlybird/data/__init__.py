"""Datasets: readers of the official file formats, and a fast in-memory batch loader."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .cifar import load_cifar
from .fashion_mnist import load_fashion_mnist
from .decode import FolderSplit
from .folder import scan_folder
from .hf import load_hf
from .images import ImageOptions, Images, decode_all, in_memory, survey
from .imagenet import class_folders, load_imagenet
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
    classes: tuple[str, ...] = ()  # one's own images: the class names, in label order
    resized_crop: bool = False  # random-resized crops of the held images (one's own large images)
    held_out: float = 0.0  # one's own images without a test split: the fraction of each class held out
    columns: tuple[str, ...] = ()  # a Hugging Face dataset's image and label columns
    root: str = ""  # the folder the data was read from, where prune, retrain and eval look when --data is not given

    def to_dict(self) -> dict:
        """Plain values, for a checkpoint (eval, prune and retrain read one's own images with them)."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(**{f.name: tuple(d[f.name]) if isinstance(d.get(f.name), list) else d[f.name]
                      for f in fields(cls) if f.name in d})


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


def is_own(name: str) -> bool:
    return name == "folder" or name.startswith("hf:")


SPLIT_SEED = 0
_SURVEYED: dict = {}  # (name, root, options, the images' identity) -> (DatasetInfo, notes)


def _own(name: str, root, opts: ImageOptions, like: DatasetInfo | None):
    """(images, info, notes) of one's own dataset: scanned (every call: a changed folder is seen)
    and surveyed (once per process for the same images), or described by ``like`` (a checkpoint's:
    its classes, size, normalization, held-out fraction and columns). The held-out split and the
    survey's sample are seeded with SPLIT_SEED, not --seed: a test split that moved with the seed
    would put test images into training."""
    if like is not None:
        columns = dict(zip(("image_column", "label_column"), like.columns))
        opts = replace(opts, val_fraction=like.held_out or opts.val_fraction, **columns)
    images = (scan_folder(root, opts.val_fraction, SPLIT_SEED) if name == "folder" else
              load_hf(name[3:], opts, SPLIT_SEED))
    notes = list(images.notes)
    if like is not None:
        if list(like.classes) != images.classes:
            raise DataError(f"{root if name == 'folder' else name} has the classes {', '.join(images.classes[:5])}"
                            f"{' ...' if len(images.classes) > 5 else ''}; the checkpoint was trained on "
                            f"{', '.join(like.classes[:5])}{' ...' if len(like.classes) > 5 else ''}: pass the "
                            "--data it was trained on")
        return images, like, notes
    key = (name, str(root), opts, images.identity())
    if key not in _SURVEYED:
        s = survey(images, opts, SPLIT_SEED)
        info = DatasetInfo(images.name, s.channels, len(images.classes), s.size, s.mean, s.std,
                           0 if s.large else max(1, s.size // 8), True, tuple(images.classes), s.large,
                           images.held_out, images.columns, str(Path(root).resolve()) if name == "folder" else "")
        _SURVEYED[key] = info, [s.note] if s.note else []
    info, survey_notes = _SURVEYED[key]
    return images, info, notes + survey_notes


@dataclass(frozen=True)
class Survey:
    """A dataset before its images are read: its shapes and, for one's own images, what the scan
    found (handed to ``load_dataset``, so a folder is scanned once per command)."""

    info: DatasetInfo
    images: Images | None = None
    notes: tuple[str, ...] = ()


def survey_dataset(name: str, root: str | Path | None = None, images: ImageOptions | None = None) -> Survey:
    """What ``dataset_info`` says, with one's own images' scan kept for ``load_dataset``."""
    if is_own(name):
        found, info, notes = _own(name, root if root is not None else "data", images or ImageOptions(), None)
        return Survey(info, found, tuple(notes))
    return Survey(dataset_info(name, root))


def dataset_info(name: str, root: str | Path | None = None, images: ImageOptions | None = None) -> DatasetInfo:
    """The dataset's shapes; for ImageNet the class count is that of ``root/train`` when it exists;
    one's own images are scanned and a sample surveyed (once per process)."""
    if is_own(name):
        return survey_dataset(name, root, images).info
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}, folder (class folders of "
                          "your own images in --data) or hf:PATH (a Hugging Face dataset)")
    info = DATASETS[name]
    if name == "imagenet" and root is not None and class_folders(Path(root) / "train"):
        info = replace(info, num_classes=len(class_folders(Path(root) / "train")))
    return info


def _subset(n: int, train_subset: int | None, seed: int) -> torch.Tensor | None:
    """The seeded random subset --train-subset keeps, or None."""
    if train_subset is None:
        return None
    if not 0 < train_subset <= n:
        raise ConfigError(f"--train-subset {train_subset} must be in 1..{n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:train_subset]


def load_dataset(name: str, root: str | Path = "data", download: bool = True, train_subset: int | None = None,
                 seed: int = 0, images: ImageOptions | None = None, like: DatasetInfo | None = None,
                 reporter=None, surveyed: Survey | None = None) -> Dataset | FolderDataset:
    """Read (or fetch) a dataset; ``train_subset`` keeps a seeded random subset of the training set.
    One's own images (``folder``, ``hf:PATH``) are read with ``images`` (see data.images), as
    ``like`` describes them where a checkpoint does, or as ``surveyed`` (``survey_dataset``'s, of
    the same name, root and options) found them; ``reporter`` receives what was found and done."""
    if is_own(name):
        own = (surveyed.images, surveyed.info, list(surveyed.notes)) if surveyed and surveyed.images is not None else \
            _own(name, root, images or ImageOptions(), like)
        return _load_own(*own, images or ImageOptions(), train_subset, seed, reporter)
    root = Path(root).expanduser()
    info = replace(dataset_info(name, root), root=str(root.resolve()))  # checkpoints remember where it was
    if name == "imagenet":
        train, test, classes = load_imagenet(root)
        keep = _subset(len(train.paths), train_subset, seed)
        if keep is not None:
            train = train.subset(keep.tolist())
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
    keep = _subset(len(xtr), train_subset, seed)
    if keep is not None:
        xtr, ytr = xtr[keep], ytr[keep]
    return Dataset(info, xtr, ytr, xte, yte)


def _load_own(images: Images, info: DatasetInfo, notes: list[str], opts: ImageOptions, train_subset: int | None,
              seed: int, reporter) -> Dataset | FolderDataset:
    keep = _subset(len(images.train), train_subset, seed)
    if keep is not None:
        images = replace(images, train=images.train.subset(keep.tolist()), _identity=None)  # other images
    held, why = in_memory(images, info, opts)
    say = reporter.line if reporter is not None else (lambda text: None)
    for note in notes:
        say(f"{info.name}: {note}")
    say(f"{info.name}: {len(images.classes)} classes, {len(images.train):,} training and {len(images.test):,} test "
        f"images at {info.image_size}x{info.image_size}, {info.in_channels} "
        f"channel{'s' if info.in_channels > 1 else ''}, mean {', '.join(f'{m:.3f}' for m in info.mean)}, std {', '.join(f'{s:.3f}' for s in info.std)}; "
        + ("held in memory" if held else "streamed through the decoding workers") + f" ({why})")
    if not held:
        return FolderDataset(info, images.train, images.test, images.classes)
    (xtr, ytr, xte, yte), note = decode_all(images, info, opts, reporter)
    say(f"{info.name}: {note}")
    return Dataset(info, xtr, ytr, xte, yte)


def loader_of(dataset: Dataset | FolderDataset, train: bool, batch_size: int, device="cpu", seed: int = 0,
              channels_last: bool = False, workers: int = 2, rank: int = 0, world: int = 1, transform=None):
    """The loader of a dataset's training or test split: the in-memory batch loader (a uint8 split is
    copied to ``device`` whole), or the decoding workers' for a dataset streamed from files."""
    if isinstance(dataset, FolderDataset):
        return FolderLoader(dataset.train if train else dataset.test, batch_size, dataset.info, train, device, seed,
                            channels_last, workers, rank, world, transform)
    images, labels = (dataset.train_images, dataset.train_labels) if train else (dataset.test_images,
                                                                                 dataset.test_labels)
    return BatchLoader(images, labels, batch_size, dataset.info, train, device, seed, channels_last, rank, world,
                       transform)


def _own_loaders(name: str, root, batch_size: int, test_batch_size: int, device, seed: int, reporter, options: dict):
    opts = ImageOptions(**options, device=str(device))
    dataset = load_dataset(name, root, False, None, seed, opts, reporter=reporter)
    return (loader_of(dataset, True, batch_size, device, seed, workers=opts.workers),
            loader_of(dataset, False, test_batch_size, device, seed, workers=opts.workers), dataset.info)


def folder(root: str | Path, batch_size: int = 256, test_batch_size: int = 256, device="cpu", seed: int = 0,
           reporter=None, **options):
    """(training loader, test loader, DatasetInfo) of class folders of one's own images
    (``root/train/<class>/``, ``root/val/<class>/``), as ``--dataset folder`` reads them: at their own
    size, held in memory where they fit, normalized, the training batches augmented on ``device``.
    ``options``: ImageOptions' fields (image_size, val_fraction, mean, std, cache, workers). Each
    loader yields (float images, labels) on ``device``; call ``set_epoch(e)`` before each pass."""
    return _own_loaders("folder", Path(root).expanduser(), batch_size, test_batch_size, device, seed, reporter, options)


def hf(path: str, batch_size: int = 256, test_batch_size: int = 256, device="cpu", seed: int = 0, reporter=None,
       **options):
    """The same for a Hugging Face dataset (a ``save_to_disk`` folder, or a name in the local cache),
    as ``--dataset hf:PATH`` reads it; ``options`` may also name image_column and label_column."""
    path = str(Path(path).expanduser()) if str(path).startswith("~") else path  # a folder, or a hub name
    return _own_loaders(f"hf:{path}", ".", batch_size, test_batch_size, device, seed, reporter, options)


__all__ = ["BatchLoader", "DATASETS", "FILTERS", "InputTransform", "Dataset", "DatasetInfo", "FolderDataset",
           "FolderLoader", "ImageOptions", "Survey", "dataset_info", "folder", "hf", "is_own", "load_dataset",
           "loader_of", "survey_dataset"]
