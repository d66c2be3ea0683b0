"""The cost of simulated 8-bit training (SWALP) against fp32, measured side by side in one run:
one SGD step (forward, backward, L1 on BN scales, update) of the same model on the same batch.

    python benchmarks/lowp_step.py [--arch vgg11] [--width 0.25] [--image-size 28] [--channels 1] [--batch 256]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from earlybird import ModelSpec, add_bn_l1_grad, create_model, resolve_arch
from earlybird.lowp import LowPrecision, Precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vgg11")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--wl", type=int, default=8)
    p.add_argument("--rounding", default="stochastic")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    arch, depth = resolve_arch(args.arch, args.depth)
    spec = ModelSpec(arch, depth, args.width, args.channels, 10, args.image_size)
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    wl = args.wl
    setups = {"fp32": LowPrecision(), f"{wl}-bit (all five)": LowPrecision(wl, wl, wl, wl, wl, args.rounding),
              f"{wl}-bit weights/grads/momentum only": LowPrecision(wl, wl, None, None, wl, args.rounding)}
    times = {}
    for name, lp in setups.items():
        torch.manual_seed(0)
        model = create_model(spec).train()
        precision = Precision(lp, model, device, 0, x[:2])
        opt = precision.optimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4))

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            add_bn_l1_grad(model, 1e-4)
            opt.step()

        step()
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            step()
            runs.append(time.perf_counter() - t)
        times[name] = statistics.median(runs)
    print(f"{spec.describe()}, batch {args.batch}, {torch.get_num_threads()} threads, {args.rounding} rounding, "
          f"median of {args.repeats} steps")
    print("setup | step ms | img/s | cost vs fp32")
    for name, t in times.items():
        print(f"{name} | {t * 1e3:.1f} | {args.batch / t:.0f} | {t / times['fp32']:.2f}x")


if __name__ == "__main__":
    main()
