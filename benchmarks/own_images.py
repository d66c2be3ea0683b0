"""One's own images, side by side in one run: the same 32x32 images as class folders and in CIFAR's
format, trained by `earlybird search`, plus the old way in (`--dataset imagenet`: upscaled to 224);
then decoding speed per worker for ImageNet-like JPEGs with and without Pillow's reduced-size
(draft) decoding.

    python benchmarks/own_images.py [--train 600 --val 100 --epochs 2]
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10


def images(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n x 32 x 32 x 3 uint8 images whose brightness and colour depend on the class."""
    labels = rng.integers(0, CLASSES, n)
    base = np.stack([40 + labels * 18, 200 - labels * 15, 90 + (labels % 3) * 40], 1)[:, None, None, :]
    return np.clip(rng.normal(base, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8), labels


def write_both(root: Path, train, val) -> tuple[Path, Path]:
    """The same images as PNG class folders and as CIFAR-10 python batches."""
    folder, cifar = root / "folder", root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for split, (x, y) in (("train", train), ("val", val)):
        for i, (img, label) in enumerate(zip(x, y)):
            (folder / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / split / f"c{label}" / f"{i}.png")
    parts = np.array_split(np.arange(len(train[0])), 5)
    for k, idx in enumerate(parts, 1):
        batch = {b"data": train[0][idx].transpose(0, 3, 1, 2).reshape(len(idx), -1), b"labels": train[1][idx].tolist()}
        (cifar / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"data": val[0].transpose(0, 3, 1, 2).reshape(len(val[0]), -1), b"labels": val[1].tolist()}
    (cifar / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    return folder, root / "cifar"


def search(label: str, args, flags: list[str], save: Path, cache: Path) -> dict:
    """One search run: images/s of its last epoch, MACs per image, seconds to its first step, wall time."""
    argv = [sys.executable, "-m", "earlybird", "search", "--arch", "vgg", "--depth", "11", "--width", "0.25",
            "--epochs", str(args.epochs), "--ratios", "0.5", "--batch-size", "64", "--device", "cpu",
            "--workers", str(args.workers), "--save", str(save), "--force", *flags]
    env = {**os.environ, "EARLYBIRD_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    row, lines = {"run": label}, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("search:"):
            row["start_s"] = time.perf_counter() - t0
            row["macs_m"] = float(re.search(r"([\d.]+) M MACs/image", line).group(1))
        if m := re.search(r"search epoch \d+/\d+ .* (\d+) img/s", line):
            row["img_s"] = int(m.group(1))
        if m := re.search(r"decoded [\d,]+ images in ([\d.]+) s", line):
            row["decode_s"] = float(m.group(1))
        if m := re.search(r"decoded images read from .* in ([\d.]+) s", line):
            row["cache_read_s"] = float(m.group(1))
    if proc.wait():
        sys.exit(f"{label} failed:\n{''.join(lines[-20:])}")
    row["wall_s"] = time.perf_counter() - t0
    return row


def decode_rate(paths: list[Path], size: int, draft: bool, repeats: int = 3) -> float:
    """Images/s of one process decoding JPEGs for a central ``size`` crop (as a worker does)."""
    from earlybird.data.decode import center_crop, open_image, to_mode

    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            img = to_mode(open_image(str(p), size if draft else None), 3)
            center_crop(img, size, size)
        best = max(best, len(paths) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jpegs", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, cifar = write_both(tmp, images(args.train, rng), images(args.val, rng))
        cache = tmp / "cache"
        rows = [search("CIFAR format (--dataset cifar10)", args, ["--dataset", "cifar10", "--data", str(cifar),
                                                                   "--no-download"], tmp / "a", cache),
                search("folder, first run (--dataset folder)", args, ["--dataset", "folder", "--data", str(folder)],
                       tmp / "b", cache),
                search("folder, second run (cache hit)", args, ["--dataset", "folder", "--data", str(folder)],
                       tmp / "c", cache),
                search("before: --dataset imagenet (224)", args, ["--dataset", "imagenet", "--data", str(folder)],
                       tmp / "d", cache)]
        cifar_rate = rows[0]["img_s"]
        print(f"\n{args.train} training and {args.val} test images of 32x32, VGG11 width 0.25, batch 64, "
              f"{args.epochs} epochs, {args.workers} workers\n")
        print("| run | MACs/image | images/s (last epoch) | vs CIFAR format | to first step | decode | cache read | wall |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['run']} | {r['macs_m']:.1f} M | {r['img_s']:,} | {r['img_s'] / cifar_rate:.2f}x | "
                  f"{r['start_s']:.1f} s | {r.get('decode_s', '-')} | {r.get('cache_read_s', '-')} | "
                  f"{r['wall_s']:.1f} s |")

        jpegs = []
        (tmp / "jpeg").mkdir()
        for i in range(args.jpegs):  # photo-like: smooth shapes and noise, about 500 x 375
            w, h = 500, 375
            yy, xx = np.mgrid[0:h, 0:w]
            img = np.stack([(xx * (i % 7 + 1) + yy) % 256, (yy * 2 + i * 13) % 256, (xx + yy * (i % 5)) % 256], 2)
            img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
            jpegs.append(tmp / "jpeg" / f"{i}.jpg")
            Image.fromarray(img).save(jpegs[-1], quality=90)
        print(f"\nDecoding {args.jpegs} JPEGs of 500x375 for a central crop, one process (one worker):\n")
        print("| crop | full decode images/s | reduced-size (draft) decode images/s | ratio |")
        print("|---|---|---|---|")
        for size in (224, 160, 112):
            full, draft = decode_rate(jpegs, size, False), decode_rate(jpegs, size, True)
            print(f"| {size} | {full:,.0f} | {draft:,.0f} | {draft / full:.2f}x |")


if __name__ == "__main__":
    main()
