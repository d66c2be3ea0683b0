"""Early-Bird bookkeeping (one BN-scale snapshot, the masks of every ratio, the window's distances)
against the training epoch it follows, measured side by side in one run.

    python benchmarks/eb_overhead.py [--arch vgg16] [--width 1.0] [--images 50000] [--batch 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from earlybird import EarlyBird, ModelSpec, add_bn_l1_grad, create_model, resolve_arch


def median_seconds(fn, repeats: int) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--images", type=int, default=50_000, help="images per epoch (CIFAR: 50,000)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="training steps timed to estimate the epoch")
    args = p.parse_args()
    arch, depth = resolve_arch(args.arch, args.depth)
    spec = ModelSpec(arch, depth, args.width, 3, 10, args.image_size)
    torch.manual_seed(0)
    model = create_model(spec).train()
    detector = EarlyBird(model, (0.3, 0.5, 0.7), window=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        add_bn_l1_grad(model, 1e-4)
        opt.step()

    step_s = median_seconds(step, args.steps)
    epoch_s = step_s * args.images / args.batch
    for _ in range(5):  # a full window, as after epoch 5
        detector.step()
    eb_s = median_seconds(detector.step, 20)
    print(f"{spec.describe()}: {detector.num_channels} BN channels, 3 ratios, window 5, "
          f"{torch.get_num_threads()} threads")
    print("EB bookkeeping per epoch | training epoch (estimated from a step) | fraction")
    print(f"{eb_s * 1e3:.2f} ms | {epoch_s:.1f} s ({args.images} images, batch {args.batch}) | {eb_s / epoch_s:.2e}")


if __name__ == "__main__":
    main()
