"""torch's batch norm + ReLU (+ 2x2 max-pool) against earlybird's fused kernel, side by side in one
run: one training forward + backward of a channels-last activation per width, at the widths VGG16
has dense and pruned (median of interleaved repeats, the CLI's allocator setting). The pool columns
are VGG's block ends: the fused BN + ReLU followed by torch's max-pool, and the pool folded in.

    python benchmarks/batch_norm.py [--batch 256] [--size 32] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from earlybird.accel.batch_norm import FusedBatchNorm2d, failure, load
from earlybird.accel.tuning import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32, help="height and width of the activation")
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16, 24, 32, 40, 64, 72, 128, 136, 256])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if load() is None:
        raise SystemExit(f"the fused kernel could not be built: {failure()}")
    keep_freed_memory()
    dtype = getattr(torch, args.dtype)
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}: ms per forward + backward")
    print("width | torch BN | torch BN + ReLU | fused BN | fused BN + ReLU | speed-up (BN + ReLU) | "
          "torch BN + ReLU + pool | fused BN + ReLU, torch's pool | fused BN + ReLU + pool | speed-up (over "
          "torch's pool after the fused BN + ReLU)")
    for c in args.widths:
        x = torch.randn(args.batch, c, args.size, args.size, dtype=dtype).contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        pooled_grad = F.max_pool2d(grad, 2).contiguous(memory_format=torch.channels_last)
        torch_bn = nn.BatchNorm2d(c)
        fused_bn = FusedBatchNorm2d(c)
        fused_relu = FusedBatchNorm2d(c)
        fused_relu.activation = "relu"
        fused_pool = FusedBatchNorm2d(c)
        fused_pool.activation, fused_pool.pool = "relu", True

        def run(bn, relu=False, pool=False):
            def step():
                xi = x.detach().requires_grad_()
                y = bn(xi)
                y = F.relu(y, inplace=True) if relu else y
                y = F.max_pool2d(y, 2) if pool else y
                y.backward(pooled_grad if y.shape != x.shape else grad)
            return step

        steps = [run(torch_bn), run(torch_bn, True), run(fused_bn), run(fused_relu),
                 run(torch_bn, True, True), run(fused_relu, pool=True), run(fused_pool)]
        times = [[] for _ in steps]
        for i in range(args.repeats + 1):
            for step, t in zip(steps, times):
                start = time.perf_counter()
                step()
                if i:  # the first round warms up
                    t.append(time.perf_counter() - start)
        ms = [statistics.median(t) * 1e3 for t in times]
        print(f"{c} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {ms[3]:.2f} | {ms[1] / ms[3]:.2f}x | {ms[4]:.2f} | "
              f"{ms[5]:.2f} | {ms[6]:.2f} | {ms[5] / ms[6]:.2f}x")


if __name__ == "__main__":
    main()
