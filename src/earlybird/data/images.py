"""One's own images, at their own size: class folders (``data.folder``) and Hugging Face datasets
(``data.hf``) both come here as two splits of images and labels.

``survey`` reads a seeded sample of the training images for what the dataset is: its channels (1
where every sampled image is grayscale, else 3), its size (the images' own where they are small:
median shorter side under 160 px; else 224) and, unless given, its per-channel mean and std.
``load_images`` then decodes every image once, by worker processes, into uint8 tensors held in
memory, served by the batch loader CIFAR uses (augmentation on the training device: a padded
random crop and flip for small images, a random-resized crop and flip for large ones), when they
fit the --cache budget; the tensors are kept in a cache file keyed by the images' identity (file
names, sizes and times; a Hugging Face dataset's fingerprint) and the size, so the next run starts
at once and a changed folder is decoded again. Larger datasets stream through the workers as
ImageNet does.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..errors import ConfigError, DataError, WriteError, format_bytes
from ..files import atomic_write, tensor_bytes, user_cache_dir
from .decode import SIZE, as_tensor, center_crop, eval_shorter, to_mode, worker_error

SMALL = 160  # median shorter side under this: the images' own size
SURVEY = 256  # images sampled for channels, size, mean and std
SINGLE_CHANNEL = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
CACHE_VERSION = 1


@dataclass(frozen=True)
class ImageOptions:
    """How one's own images are read (the --image-size, --val-fraction, --mean/--std, --cache,
    --image-column/--label-column and --workers flags); ``device``: where training runs (whose
    memory the in-memory budget is a quarter of)."""

    image_size: int | None = None
    val_fraction: float = 0.1
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    cache: str = "auto"
    image_column: str | None = None
    label_column: str | None = None
    workers: int = 2
    device: str = "cpu"

    def __post_init__(self):
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise ConfigError(f"--image-size {self.image_size} must be in 8..1024 pixels")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction:g} must be in (0, 1)")
        if self.cache not in ("auto", "on", "off"):
            raise ConfigError(f"--cache {self.cache} must be auto, on or off")
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std)):
            raise ConfigError("--mean and --std go together, one value per channel each (e.g. --mean 0.5 --std 0.25)")
        if self.std and min(self.std) <= 0:
            raise ConfigError("--std values must be positive")


@dataclass
class Images:
    """A dataset of one's own images before decoding: two splits (``len``, ``open(i)``, ``labels``,
    ``key()``), the class names, and notes for the first lines (files skipped, a held-out split)."""

    name: str
    train: object
    test: object
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    held_out: float = 0.0  # the fraction of each class held out for testing (no test split of its own)
    columns: tuple[str, ...] = ()  # a Hugging Face dataset's image and label columns
    _identity: str | None = field(default=None, repr=False)

    def identity(self) -> str:
        """What the images are (every file's name, size and time; a dataset's fingerprint), as JSON:
        worked out once (a million files take seconds to stat)."""
        if self._identity is None:
            self._identity = json.dumps([self.name, self.train.key(), self.test.key()])
        return self._identity


@dataclass(frozen=True)
class Survey:
    channels: int
    size: int
    large: bool  # over SMALL: random-resized crops, and a test resize of 256/224 of the size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    note: str


def hold_out(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out) indices: a seeded ``fraction`` of each class (at least one image where the
    class has two or more) held out for testing."""
    rng, keep, held, by_class = random.Random(seed), [], [], {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        held += members[:k]
        keep += members[k:]
    return sorted(keep), sorted(held)


def _sample(n: int, k: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(n), min(n, k)))


def survey(images: Images, opts: ImageOptions, seed: int = 0) -> Survey:
    """Channels, size and normalization of the dataset, from a sample of its training images."""
    picked = _sample(len(images.train), SURVEY, seed)
    opened = [images.train.open(i) for i in picked]
    channels = 1 if all(img.mode in SINGLE_CHANNEL for img in opened) else 3
    shorter = sorted(min(img.size) for img in opened)
    median = shorter[len(shorter) // 2]
    large = median >= SMALL
    size = opts.image_size or (SIZE if large else median)
    note = ""
    if shorter[-1] > 2 * shorter[0] or any(img.size[0] != img.size[1] for img in opened):
        sizes = sorted({img.size for img in opened}, key=min)
        note = (f"images from {sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]} px (sampled): each is "
                f"resized to {size} px on its shorter side and center-cropped to {size}x{size}")
    if opts.mean is not None:
        if len(opts.mean) != channels:
            raise ConfigError(f"--mean and --std give {len(opts.mean)} values; the images have {channels} "
                              f"channel{'s' if channels > 1 else ''}")
        return Survey(channels, size, large, tuple(opts.mean), tuple(opts.std), note)
    pixels = torch.stack([as_tensor(center_crop(to_mode(img, channels), size, size)) for img in opened]).float() / 255
    mean = pixels.mean((0, 2, 3))
    std = pixels.std((0, 2, 3)).clamp(min=1e-3)
    return Survey(channels, size, large, tuple(round(float(m), 4) for m in mean),
                  tuple(round(float(s), 4) for s in std), note)


class _Decode(torch.utils.data.Dataset):
    """One image decoded, converted, resized on its shorter side and center-cropped (in a worker)."""

    def __init__(self, split, size: int, shorter: int, channels: int):
        self.split, self.size, self.shorter, self.channels = split, size, shorter, channels

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        img = to_mode(self.split.open(i, self.shorter), self.channels)
        return as_tensor(center_crop(img, self.size, self.shorter)), self.split.labels[i]


def decode_split(split, size: int, shorter: int, channels: int, workers: int, reporter, what: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N x C x size x size, int64 labels) of a whole split, decoded by ``workers`` processes."""
    n = len(split)
    images = torch.empty(n, channels, size, size, dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(_Decode(split, size, shorter, channels), batch_size=64,
                                         num_workers=workers)
    update, close = reporter.bar(n, f"decoding {what}") if reporter else ((lambda done: None), (lambda: None))
    done = 0
    try:
        for x, _ in loader:
            images[done:done + len(x)] = x
            done += len(x)
            update(done)
    except DataError as exc:  # raised in a worker: keep its own one-line message
        raise worker_error(exc) from None
    finally:
        close()
    return images, torch.as_tensor(split.labels, dtype=torch.int64)


def available_memory(device: str) -> int:
    """Bytes free for the decoded images: the host's available memory, and the GPU's free memory
    where training runs on one."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        host = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration, ValueError):
        host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return min(host, torch.cuda.mem_get_info(dev)[0])
    return host


def in_memory(images: Images, info, opts: ImageOptions) -> tuple[bool, str]:
    """Whether the decoded images are held in memory, and why."""
    need = (len(images.train) + len(images.test)) * info.in_channels * info.image_size ** 2
    if opts.cache != "auto":
        return opts.cache == "on", f"--cache {opts.cache}"
    budget = available_memory(opts.device) // 4
    why = (f"{format_bytes(need)} decoded, {'within' if need <= budget else 'over'} a quarter of the free memory "
           f"({format_bytes(budget)})")
    return need <= budget, why


def _cache_path(images: Images, info) -> Path:
    key = [CACHE_VERSION, images.identity(), info.in_channels, info.image_size, info.resized_crop]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
    return user_cache_dir() / "images" / f"{digest}.pt"


CACHE_MAX = "EARLYBIRD_IMAGE_CACHE_MAX"  # the decoded-image caches' size cap, e.g. 20G (the default) or 500M
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def cache_cap() -> int:
    """The size the decoded-image cache files may take together, in bytes (``$EARLYBIRD_IMAGE_CACHE_MAX``)."""
    text = os.environ.get(CACHE_MAX, "20G").strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "")
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise ConfigError(f"{CACHE_MAX}={os.environ[CACHE_MAX]}: give a size such as 20G or 500M") from None


def _keep_under_cap(kept: Path) -> str:
    """Drop the least recently used decoded-image cache files beyond ``cache_cap()`` (never ``kept``,
    just written); what was dropped, or ''."""
    cap, files = cache_cap(), []
    for p in kept.parent.glob("*.pt"):
        try:
            files.append((p.stat().st_mtime, p.stat().st_size, p))
        except OSError:  # another process dropped it meanwhile
            pass
    total, freed, count = sum(size for _, size, _ in files), 0, 0
    for _, size, p in sorted(files):
        if total - freed <= cap:
            break
        if p != kept:
            p.unlink(missing_ok=True)
            freed, count = freed + size, count + 1
    return (f"; dropped {count} less recently used decoded-image cache file{'s' if count > 1 else ''} "
            f"({format_bytes(freed)}) to stay under {CACHE_MAX}={format_bytes(cap)}") if count else ""


def decode_all(images: Images, info, opts: ImageOptions, reporter) -> tuple[tuple, str]:
    """((train images, labels, test images, labels), note): from the cache file where the same
    images were decoded at this size before, else decoded now and kept there (a cache file that
    cannot be read is decoded again and replaced)."""
    path = _cache_path(images, info)
    damaged = ""
    if path.is_file():
        try:
            t0 = time.perf_counter()
            saved = torch.load(path, map_location="cpu", weights_only=True)
            parts = (saved["train"], saved["train_labels"], saved["test"], saved["test_labels"])
            os.utime(path)  # recently used: the size cap drops others first
            return parts, f"decoded images read from {path} in {time.perf_counter() - t0:.1f} s"
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises (text: an UnpicklingError)
            damaged = f"the decoded images in {path} could not be read ({type(exc).__name__}): decoding them again; "
    t0 = time.perf_counter()
    size, large = info.image_size, info.resized_crop
    train = decode_split(images.train, size, size, info.in_channels, opts.workers, reporter, "training images")
    test = decode_split(images.test, size, eval_shorter(size, large), info.in_channels, opts.workers, reporter,
                        "test images")
    seconds = time.perf_counter() - t0
    n = len(images.train) + len(images.test)
    note = (f"{damaged}decoded {n:,} images in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} images/s, "
            f"{opts.workers} workers)")
    saved = {"train": train[0], "train_labels": train[1], "test": test[0], "test_labels": test[1]}
    try:
        atomic_write(path, partial(torch.save, saved), tensor_bytes(saved))
        note += f"; kept in {path} for the next run" + _keep_under_cap(path)
    except WriteError as exc:
        note += f"; not kept ({exc.reason})"
    return (*train, *test), note
