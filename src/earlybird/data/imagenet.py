"""ImageNet in the standard class-folder layout: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.

JPEGs are decoded by worker processes (Pillow) with the standard augmentation: training images
get a random-resized crop (scale 0.08-1, aspect 3/4-4/3) to 224 and a horizontal flip; validation
images are resized to 256 on the shorter side and center-cropped to 224. Workers return uint8
tensors; normalization runs on the training device, on whole batches. Each image's crop and flip
depend only on (seed, epoch, index), so runs are reproducible whatever the number of workers.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

MAX_PIXELS = "EARLYBIRD_MAX_IMAGE_PIXELS"  # Pillow's decompression-bomb limit, raised for trusted data

EXTENSIONS = (".jpeg", ".jpg", ".png")
SIZE, RESIZE = 224, 256


@dataclass
class FolderSplit:
    paths: list[str]
    labels: list[int]


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


def _random_resized_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((SIZE, SIZE), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    side = min(w, h)  # fallback: the central square
    x, y = (w - side) // 2, (h - side) // 2
    return img.resize((SIZE, SIZE), Image.BILINEAR, box=(x, y, x + side, y + side))


def _center_crop(img: Image.Image) -> Image.Image:
    w, h = img.size
    scale = RESIZE / min(w, h)
    img = img.resize((max(RESIZE, round(w * scale)), max(RESIZE, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    x, y = (w - SIZE) // 2, (h - SIZE) // 2
    return img.crop((x, y, x + SIZE, y + SIZE))


class ImageFolderSet(torch.utils.data.Dataset):
    """Decodes and augments one image per index; ``epoch`` is set before each pass."""

    def __init__(self, split: FolderSplit, train: bool, seed: int):
        self.split, self.train, self.seed, self.epoch = split, train, seed, 0

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, i: int):
        path = self.split.paths[i]
        if os.environ.get(MAX_PIXELS):  # read here: decoding workers are other processes
            Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS])
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise DataError(f"{path} is too large to decode safely ({exc}): shrink or delete it, or if you trust "
                            f"it raise the limit with {MAX_PIXELS}=<pixels>") from None
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path} is not a readable image ({exc}): delete or replace it") from None
        if self.train:
            rng = random.Random((self.seed * 1_000_003 + self.epoch) * 100_000_007 + i)
            img = _random_resized_crop(img, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = _center_crop(img)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()), self.split.labels[i]
