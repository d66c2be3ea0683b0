"""Batches from a uint8 dataset held whole on the training device (no worker processes).

Augmentation (random crop after zero padding, horizontal flip) and normalization run on whole
batches with tensor ops, which is far faster than per-image transforms, on a CPU as on a GPU.
The shuffle order depends only on (seed, epoch) and a batch's augmentation only on (seed, epoch,
batch), so a run resumed at any batch sees the batches an uninterrupted one sees.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F


def normalizer(info, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with x * scale + shift == (x / 255 - mean) / std, per channel."""
    c = info.in_channels
    std = torch.tensor(info.std, device=device).view(1, c, 1, 1)
    mean = torch.tensor(info.mean, device=device).view(1, c, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def global_batches(n: int, batch_size: int, train: bool, world: int) -> list[tuple[int, int]]:
    """[start, stop) of every global batch; a last training batch too small to give every worker a
    sample is left out (on every worker, so they stay in step)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if train and bounds and bounds[-1][1] - bounds[-1][0] < world:
        bounds.pop()
    return bounds


def count_batches(n: int, batch_size: int, train: bool, rank: int, world: int) -> int:
    """How many batches a worker's loader yields: the global batches in which its part is not empty."""
    return sum(1 for start, stop in global_batches(n, batch_size, train, world) if stop - start > rank)


def shard(start: int, stop: int, rank: int, world: int) -> tuple[int, int]:
    """This worker's part of the global batch [start, stop): equal parts, the first ones one larger."""
    bounds = torch.tensor_split(torch.arange(start, stop), world)[rank]
    return (int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else (start, start)


class BatchLoader:
    """Global batches of ``batch_size``; with several workers each yields its own part of every one,
    augmented exactly as one process would (the random draws cover the whole global batch)."""

    def __init__(self, images, labels, batch_size: int, info, train: bool, device="cpu", seed: int = 0,
                 channels_last: bool = False, rank: int = 0, world: int = 1, transform=None):
        self.transform = transform if transform is not None and transform.active else None
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.info = info
        self.train = train
        self.device = torch.device(device)
        self.seed = seed
        self.epoch = self.skip = 0
        self.rank, self.world = rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._scale, self._shift = normalizer(info, device)

    def __len__(self) -> int:
        return count_batches(len(self.images), self.batch_size, self.train, self.rank, self.world)

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass is of ``epoch`` and starts after its first ``skip`` batches (a resumed run)."""
        self.epoch, self.skip = epoch, skip

    def _augment(self, x: torch.Tensor, gen: torch.Generator, n: int, part: slice) -> torch.Tensor:
        """Crop and flip ``x``, the ``part`` of a global batch of ``n`` images."""
        _, _, h, w = x.shape
        pad = self.info.crop_padding
        if pad:
            dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=self.device)[part]
            dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=self.device)[part]
            padded = F.pad(x, (pad, pad, pad, pad))
            rows = (dy + torch.arange(h, device=self.device))[:, None, :, None]
            cols = (dx + torch.arange(w, device=self.device))[:, None, None, :]
            batch = torch.arange(len(x), device=self.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=self.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.info.resized_crop:
            x = self._resized_crop(x, gen, n, part)
        if self.info.flip:
            flip = (torch.rand(n, generator=gen, device=self.device) < 0.5)[part]
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def _resized_crop(self, x: torch.Tensor, gen: torch.Generator, n: int, part: slice) -> torch.Tensor:
        """A random-resized crop of each image (area 8-100%, aspect 3/4-4/3, as torchvision's) scaled
        back to the image's size, bilinear, as one batched resampling."""
        def draw(low: float, high: float) -> torch.Tensor:
            return (low + (high - low) * torch.rand(n, generator=gen, device=self.device))[part]

        area, log_aspect = draw(0.08, 1.0), draw(math.log(3 / 4), math.log(4 / 3))
        w = (area * log_aspect.exp()).sqrt().clamp(max=1.0)  # fractions of the side
        h = (area / log_aspect.exp()).sqrt().clamp(max=1.0)
        cx, cy = (2 * draw(0.0, 1.0) - 1) * (1 - w), (2 * draw(0.0, 1.0) - 1) * (1 - h)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __iter__(self):
        seed = self.seed * 100_003 + self.epoch
        gen = torch.Generator(device=self.device).manual_seed(seed)
        n = len(self.images)
        order = torch.randperm(n, generator=gen, device=self.device) if self.train else torch.arange(n, device=self.device)
        batches = global_batches(n, self.batch_size, self.train, self.world)
        skip, self.skip = self.skip, 0
        for b, (start, stop) in enumerate(batches[skip:], skip):
            lo, hi = shard(start, stop, self.rank, self.world)
            if lo == hi:  # a last evaluation batch smaller than the number of workers
                continue
            idx = order[lo:hi]
            x = self.images[idx]
            if self.train:
                gen.manual_seed(seed * 1_000_003 + b)
                x = self._augment(x, gen, stop - start, slice(lo - start, hi - start))
            x = x.float() if self.transform is None else self.transform(x.float())
            yield (x * self._scale + self._shift).contiguous(memory_format=self.memory_format), self.labels[idx]


class FolderLoader:
    """Batches of images decoded by worker processes (see data.decode), normalized on the device.

    Same interface as BatchLoader; the shuffle order depends only on (seed, epoch).
    """

    def __init__(self, split, batch_size: int, info, train: bool, device="cpu", seed: int = 0,
                 channels_last: bool = False, workers: int = 2, rank: int = 0, world: int = 1, transform=None):
        from .decode import ImageFolderSet, to_mode

        self.transform = transform if transform is not None and transform.active else None
        self.dataset = ImageFolderSet(split, train, seed, info.image_size, partial(to_mode, channels=info.in_channels),
                                      info.crop_padding)
        self.batch_size, self.info, self.train, self.seed, self.workers = batch_size, info, train, seed, workers
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.epoch = self.skip = 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._scale, self._shift = normalizer(info, self.device)
        # once: a progress bar asks for the length every few steps, and a million-image index is slow to walk
        self._length = count_batches(len(self.dataset), batch_size, train, rank, world)

    def _batches(self, order: list[int]) -> list[list[int]]:
        """This worker's part of every global batch."""
        return [order[slice(*shard(start, stop, self.rank, self.world))]
                for start, stop in global_batches(len(order), self.batch_size, self.train, self.world)]

    def __len__(self) -> int:
        return self._length

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """The next pass is of ``epoch`` and starts after its first ``skip`` batches (a resumed run)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        from ..errors import DataError
        from .decode import worker_error

        self.dataset.epoch = self.epoch  # workers start per pass, so they see this epoch
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        skip, self.skip = self.skip, 0
        batches = [b for b in self._batches(order.tolist())[skip:] if b]
        # its own generator: the workers' base seed is not drawn from the global RNG, which a run
        # resumed inside an epoch restores after the point where an uninterrupted run drew it
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda", generator=torch.Generator())
        try:
            for x, y in loader:
                x = x.to(self.device, non_blocking=True).float()
                x = (x if self.transform is None else self.transform(x)) * self._scale + self._shift
                yield x.contiguous(memory_format=self.memory_format), y.to(self.device, non_blocking=True)
        except DataError as exc:  # raised in a worker: keep its own one-line message
            raise worker_error(exc) from None
