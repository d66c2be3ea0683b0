"""ImageNet in the standard class-folder layout: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

JPEGs are decoded by worker processes (``data.decode``) with the standard augmentation: training
images get a random-resized crop (scale 0.08-1, aspect 3/4-4/3) to 224 and a horizontal flip;
validation images are resized to 256 on the shorter side and center-cropped to 224.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .decode import EXTENSIONS, FolderSplit


def class_folders(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir()) if split_dir.is_dir() else []


def _scan(split_dir: Path, classes: list[str]) -> FolderSplit:
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        folder = split_dir / wnid
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in EXTENSIONS:
                paths.append(str(f))
                labels.append(label)
    return FolderSplit(paths, labels)


def load_imagenet(root: Path) -> tuple[FolderSplit, FolderSplit, list[str]]:
    train_dir, val_dir = root / "train", root / "val"
    classes = class_folders(train_dir)
    hint = ("ImageNet cannot be downloaded automatically: put the extracted train/<wnid>/*.JPEG and "
            f"val/<wnid>/*.JPEG folders under {root} (or pass --data DIR)")
    if not classes or not val_dir.is_dir():
        raise DataError(f"no ImageNet class folders in {train_dir} and {val_dir}: {hint}")
    unknown = set(class_folders(val_dir)) - set(classes)
    if unknown:
        raise DataError(f"{val_dir} has classes that {train_dir} lacks ({', '.join(sorted(unknown)[:3])}): "
                        "are the val images sorted into class folders?")
    train, val = _scan(train_dir, classes), _scan(val_dir, classes)
    if not train.paths or not val.paths:
        raise DataError(f"no JPEG images under {train_dir if not train.paths else val_dir}: {hint}")
    return train, val, classes


