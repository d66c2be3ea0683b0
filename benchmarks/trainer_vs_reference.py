"""Our trainer against a reference-style loop, side by side in one run, same model, batch and data.

Reference style (the original scripts): every image decoded to PIL and augmented in Python (pad 4,
random 32x32 crop, flip), a one-worker DataLoader, fp32, the L1 term added by a Python loop over
modules, evaluation with autograd on, fp32, the C allocator as it comes. Ours: the uint8 split held
on the device, crop/flip/normalize batched there, evaluation under inference_mode, in both memory
formats, in fp32 and under autocast, without and with the allocator setting the CLI makes on CPUs
(part of ``--cpu-kernels on``).

    python benchmarks/trainer_vs_reference.py [--depth 16] [--width 1.0] [--images 1024] [--batch 128]
    python benchmarks/trainer_vs_reference.py --device cuda --images 16384 --batch 256
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from earlybird import ModelSpec, create_model
from earlybird.config import RuntimeConfig
from earlybird.data import BatchLoader, dataset_info
from earlybird.accel.batch_norm import fuse_batch_norm
from earlybird.accel.speed import choose_gemm, fastest_with_gemm, speed_candidates
from earlybird.train import evaluate, train_epoch
from earlybird.accel.tuning import (autocast_slowdown, default_autocast_dtype, keep_freed_memory, precision_name,
                                    setting_name)

INFO = dataset_info("cifar10")


class ReferenceStyle(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool):
        self.images, self.labels, self.train = images, labels, train
        self.mean = np.array(INFO.mean, dtype=np.float32)[:, None, None]
        self.std = np.array(INFO.std, dtype=np.float32)[:, None, None]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        if self.train:
            img = ImageOps.expand(img, border=4, fill=0)
            x, y = random.randint(0, 8), random.randint(0, 8)
            img = img.crop((x, y, x + 32, y + 32))
            if random.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((arr - self.mean) / self.std), int(self.labels[i])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_epoch(model, loader, optimizer, s, device):
    model.train()
    start, seen = time.perf_counter(), 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)  # the reference's data.cuda()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for m in model.modules():  # the reference's updateBN
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.grad.data.add_(s * torch.sign(m.weight.data))
        optimizer.step()
        seen += len(y)
    sync(device)
    return seen / (time.perf_counter() - start)


def reference_eval(model, loader, device):
    model.eval()
    start, seen, correct = time.perf_counter(), 0, 0
    for x, y in loader:  # autograd stays on, as in the reference's test()
        x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    spec = ModelSpec("vgg", args.depth, args.width, 3, 10, 32)
    rows = {}

    torch.manual_seed(0)
    model = create_model(spec).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    pin = device.type == "cuda"  # the reference's kwargs: one worker, pinned memory on GPUs
    train = torch.utils.data.DataLoader(ReferenceStyle(images, labels, True), args.batch, shuffle=True, num_workers=1,
                                        pin_memory=pin)
    test = torch.utils.data.DataLoader(ReferenceStyle(images, labels, False), 256, num_workers=1, pin_memory=pin)
    reference_epoch(model, train, opt, 1e-4, device)  # warm-up
    rows["reference style"] = (reference_epoch(model, train, opt, 1e-4, device), reference_eval(model, test, device))

    # The allocator setting is process-wide and cannot be undone: our rows without it come first.
    amp = default_autocast_dtype(device)
    amps = tuple(dict.fromkeys(d for _, d in speed_candidates(RuntimeConfig(), device, False)))  # as --amp auto
    for keep_memory in (False, True) if device.type == "cpu" else (False,):
        if keep_memory:
            keep_freed_memory()
        last_pass = keep_memory or device.type == "cuda"  # autocast rows once, with the CLI's allocator setting
        settings = ((False, None), (True, None)) + (((False, amp), (True, amp)) if last_pass and amp in amps else ())
        # the fused batch norm and the GEMM convolutions (the CLI's defaults on CPUs) serve channels-last
        # steps: with the allocator setting, the fused BN alone and with GEMM
        extra = keep_memory and device.type == "cpu"
        variants = [(s, False, False) for s in settings] + [
            (s, True, gemm) for s in settings if extra and s[0] for gemm in (False, True)]
        for setting, fused, gemm in variants:
            channels_last, amp_dtype = setting
            torch.manual_seed(0)
            model = create_model(spec).to(device)
            if fused:
                fuse_batch_norm(model)
            if gemm:
                choose_gemm(model, RuntimeConfig(), (3, 32, 32), args.batch, device, [setting])
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
            scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
            x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            y = torch.from_numpy(labels)
            train = BatchLoader(x, y, args.batch, INFO, True, device, channels_last=channels_last)
            test = BatchLoader(x, y, 256, INFO, False, device, channels_last=channels_last)
            train_epoch(model, train, opt, l1=1e-4, scaler=scaler, amp_dtype=amp_dtype)  # warm-up
            result = train_epoch(model, train, opt, l1=1e-4, scaler=scaler, amp_dtype=amp_dtype)
            start = time.perf_counter()
            evaluate(model, test, amp_dtype)
            name = f"earlybird, {setting_name(setting)}" + (", keep memory" if keep_memory else "") + (
                ", fused BN" if fused else "") + (", GEMM conv" if gemm else "")
            rows[name] = (result.images_per_second, args.images / (time.perf_counter() - start))
    settings = [(cl, dtype) for cl in (False, True) for dtype in amps]
    timed = create_model(spec)
    cpu = device.type == "cpu"
    if cpu:
        fuse_batch_norm(timed)
    best, _, found = fastest_with_gemm(timed, RuntimeConfig(), (3, 32, 32), 10, args.batch, device, settings)
    default = f"earlybird, {setting_name(best)}" + (", keep memory" if cpu else "")
    gemm = best[0] and found.get(best[1])
    default += (", fused BN" if cpu and best[0] else "") + (", GEMM conv" if gemm else "")

    print(f"VGG{args.depth} width {args.width:g}, {args.images} CIFAR-size images, batch {args.batch}, on {device}, "
          f"{torch.get_num_threads()} CPU threads")
    if amp not in amps:
        print(f"no {precision_name(amp)} rows: a probe convolution took {autocast_slowdown(device.type, amp):.1f}x "
              "as long as in fp32 here, so --amp auto does not time it")
    print("trainer | train img/s | train ratio | eval img/s | eval ratio")
    base = rows["reference style"]
    for name, (tr, ev) in rows.items():
        print(f"{name} | {tr:.0f} | {tr / base[0]:.2f}x | {ev:.0f} | {ev / base[1]:.2f}x")
    print(f"the CLI's default (--channels-last auto --amp auto: the fastest setting, timed) is the row '{default}'")


if __name__ == "__main__":
    main()
