"""Decoding image files (Pillow) for the loaders that read them: ImageNet's, and one's own images.

Worker processes decode and augment one image each: training images get a random-resized crop
(scale 0.08-1, aspect 3/4-4/3) and a horizontal flip; evaluation images are resized on the shorter
side and center-cropped (256 -> 224 for ImageNet). Workers return uint8 tensors; normalization
runs on the training device, on whole batches. Each image's crop and flip depend only on (seed,
epoch, index), so runs are reproducible whatever the number of workers.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

MAX_PIXELS = "EARLYBIRD_MAX_IMAGE_PIXELS"  # Pillow's decompression-bomb limit, raised for trusted data

EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SIZE, RESIZE = 224, 256


@dataclass
class FolderSplit:
    """Image files and their labels; ``open`` decodes one (a one-line DataError where it cannot)."""

    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, i: int, shorter: int | None = None) -> Image.Image:
        return open_image(self.paths[i], shorter)

    def subset(self, keep: list[int]) -> "FolderSplit":
        return FolderSplit([self.paths[i] for i in keep], [self.labels[i] for i in keep])

    def key(self) -> list:
        """What the images are: every file's name, size and modification time."""
        stats = [os.stat(p) for p in self.paths]
        return [[p, s.st_size, s.st_mtime_ns, label] for p, s, label in zip(self.paths, stats, self.labels)]


def eval_shorter(size: int, large: bool = True) -> int:
    """The shorter side an evaluation image is resized to before its central ``size`` crop: 256/224
    of it for large images (ImageNet's 256 -> 224), the size itself for small ones."""
    return round(size * RESIZE / SIZE) if large else size


def worker_error(exc: DataError) -> DataError:
    """A DataError raised in a DataLoader worker, as its own one line (torch re-raises it with the
    worker's traceback in the message)."""
    return DataError(str(exc).strip().splitlines()[-1].removeprefix("earlybird.errors.DataError: "))


def open_image(source, shorter: int | None = None, name: str | None = None) -> Image.Image:
    """The decoded image at the path ``source`` (or in the file object ``source``, called ``name`` in
    errors); a JPEG that will be resized to ``shorter`` pixels on its shorter side is decoded at the
    smallest DCT scale that still covers that (Pillow's draft mode: 2-8x fewer pixels to decode for a
    photo shrunk to 224)."""
    path = name or source
    if os.environ.get(MAX_PIXELS):  # read here: decoding workers are other processes
        Image.MAX_IMAGE_PIXELS = int(os.environ[MAX_PIXELS])
    try:
        with Image.open(source) as f:
            if shorter and f.format == "JPEG":
                scale = shorter / min(f.size)
                f.draft(f.mode, (math.ceil(f.size[0] * scale), math.ceil(f.size[1] * scale)))
            f.load()
            return f.copy()
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path} is too large to decode safely ({exc}): shrink or delete it, or if you trust "
                        f"it raise the limit with {MAX_PIXELS}=<pixels>") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({exc}): delete or replace it") from None


def random_resized_crop(img: Image.Image, rng: random.Random, size: int = SIZE) -> Image.Image:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    side = min(w, h)  # fallback: the central square
    x, y = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))


def center_crop(img: Image.Image, size: int = SIZE, shorter: int = RESIZE) -> Image.Image:
    """Resized to ``shorter`` pixels on the shorter side, then the central ``size`` x ``size``."""
    w, h = img.size
    if (w, h) != (size, size) or shorter != size:
        scale = shorter / min(w, h)
        img = img.resize((max(shorter, round(w * scale)), max(shorter, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    x, y = (w - size) // 2, (h - size) // 2
    return img.crop((x, y, x + size, y + size))


def as_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 C x H x W of an RGB or L image."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy((array[:, :, None] if array.ndim == 2 else array).transpose(2, 0, 1).copy())


def to_mode(img: Image.Image, channels: int = 3) -> Image.Image:
    """The image as 8-bit RGB (``channels`` 3) or L (1): 16- and 32-bit integer images scaled to 8
    bits (Pillow's own conversion clips them at 255), transparency composited onto black, palettes
    expanded."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(a * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageFolderSet(torch.utils.data.Dataset):
    """Decodes and augments one image per index; ``epoch`` is set before each pass. ``split``: any
    list of images with ``open(i)`` and ``labels`` (files, a Hugging Face dataset); ``convert``
    turns a decoded image into the dataset's mode (RGB or L) before it is resized. ``padding`` 0
    (ImageNet, large images): a random-resized crop for training, the central crop of a 256/224
    resize for evaluation; over 0 (small images, as the in-memory loader augments them): the
    central crop, shifted at random within that much zero padding for training."""

    def __init__(self, split, train: bool, seed: int, size: int = SIZE, convert=to_mode, padding: int = 0):
        self.split, self.train, self.seed, self.epoch, self.size, self.convert = split, train, seed, 0, size, convert
        self.padding = padding

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        # decode no finer than the crop needs (a JPEG at a reduced DCT scale): the evaluation crop's
        # shorter side, or for training the smallest random crop (8% of the area, aspect 3/4) at full size
        small = self.padding > 0
        need = (eval_shorter(self.size, not small) if not self.train or small else
                math.ceil(self.size / math.sqrt(0.08 * 3 / 4)))
        img = self.convert(self.split.open(i, need))
        if not self.train:
            return as_tensor(center_crop(img, self.size, need)), self.split.labels[i]
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 100_000_007 + i)
        img = (self._shifted(center_crop(img, self.size, need), rng) if small else
               random_resized_crop(img, rng, self.size))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return as_tensor(img), self.split.labels[i]

    def _shifted(self, img: Image.Image, rng: random.Random) -> Image.Image:
        p = self.padding
        canvas = Image.new(img.mode, (self.size + 2 * p, self.size + 2 * p))
        canvas.paste(img, (p, p))
        dx, dy = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
        return canvas.crop((dx, dy, dx + self.size, dy + self.size))
