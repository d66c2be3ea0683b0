"""Batches from a uint8 dataset held whole on the training device (no worker processes).

Augmentation (random crop after zero padding, horizontal flip) and normalization run on whole
batches with tensor ops, which is far faster than per-image transforms, on a CPU as on a GPU.
The shuffle order depends only on (seed, epoch), so a resumed run sees the same batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchLoader:
    def __init__(self, images, labels, batch_size: int, info, train: bool, device="cpu", seed: int = 0,
                 channels_last: bool = False):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.info = info
        self.train = train
        self.device = torch.device(device)
        self.seed = seed
        self.epoch = 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        c = info.in_channels
        std = torch.tensor(info.std, device=device).view(1, c, 1, 1)
        mean = torch.tensor(info.mean, device=device).view(1, c, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        pad = self.info.crop_padding
        if pad:
            padded = F.pad(x, (pad, pad, pad, pad))
            dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=self.device)
            dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=self.device)
            rows = (dy + torch.arange(h, device=self.device))[:, None, :, None]
            cols = (dx + torch.arange(w, device=self.device))[:, None, None, :]
            batch = torch.arange(n, device=self.device)[:, None, None, None]
            chans = torch.arange(x.shape[1], device=self.device)[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.info.flip:
            flip = torch.rand(n, generator=gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def __iter__(self):
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.images)
        order = torch.randperm(n, generator=gen, device=self.device) if self.train else torch.arange(n, device=self.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.train:
                x = self._augment(x, gen)
            x = (x.float() * self._scale + self._shift).contiguous(memory_format=self.memory_format)
            yield x, self.labels[idx]
