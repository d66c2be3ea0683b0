"""How much of the device our training step uses: VGG on CIFAR-size data, images/s of the
earlybird trainer (data held on the device, its own crop/flip) next to the device's measured
matrix-multiply rate, measured in the same run. The fraction is the arithmetic of training
(3 forward passes' MACs x 2 FLOPs x images/s) over the rate of a large square matrix product in the
same precision: bf16 with --amp (GPUs), fp32 without.

    python benchmarks/step_efficiency.py [--amp]                          # CPU: VGG16, batch 256
    python benchmarks/step_efficiency.py --device cuda --amp --images 50000 [--compile]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from earlybird import ModelSpec, create_model
from earlybird.cost import TRAIN_PASSES, count_macs
from earlybird.data import BatchLoader, dataset_info
from earlybird.config import RuntimeConfig
from earlybird.accel.batch_norm import fuse_batch_norm
from earlybird.accel.speed import fastest_with_gemm
from earlybird.train import train_epoch
from earlybird.accel.tuning import keep_freed_memory


def _rate(fn, flops: float, device: torch.device, seconds: float) -> float:
    fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and runs >= 3:
            return flops * runs / elapsed


@torch.no_grad()
def matrix_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n x n matrix product, the faster of torch.matmul (BLAS) and the same product
    as a 1x1 convolution (oneDNN / cuDNN): on AMD CPUs MKL's matmul reaches half of what oneDNN does."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(n // 128, n, 16, 8, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = b.view(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
    flops = 2 * n**3
    return max(_rate(lambda: a @ b, flops, device, seconds), _rate(lambda: F.conv2d(x, w), flops, device, seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--images", type=int, default=2048, help="training images per timed epoch")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast, against the bf16 matrix rate")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-fused-bn", action="store_true", help="torch's batch norm on CPUs (the CLI fuses it)")
    p.add_argument("--no-gemm-conv", action="store_true",
                   help="torch's convolutions on CPUs (the CLI computes some parts as GEMM where timing says so)")
    p.add_argument("--matmul-size", type=int, default=None, help="a multiple of 128; default: 8192 on GPUs, 2048 on CPUs")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as the CLI does
    dtype = torch.bfloat16 if args.amp else torch.float32
    rate = matrix_rate(device, dtype, args.matmul_size or (8192 if device.type == "cuda" else 2048))

    info = dataset_info("cifar10")
    spec = ModelSpec("vgg", args.depth, args.width, 3, 10, 32)
    torch.manual_seed(0)
    model = create_model(spec).to(device)
    macs = count_macs(model, (3, 32, 32))
    fused = device.type == "cpu" and not args.no_fused_bn and not args.compile and fuse_batch_norm(model) > 0
    formats = [False, True] if args.channels_last == "auto" else [args.channels_last == "on"]
    amp_dtype = dtype if args.amp else None
    rt = RuntimeConfig(compile=args.compile, cpu_kernels="off" if args.no_gemm_conv else "on")
    (channels_last, _), _, found = fastest_with_gemm(model, rt, (3, 32, 32), 10, args.batch, device,
                                                     [(f, amp_dtype) for f in formats])
    gemm_layers = len(found.get(amp_dtype, {})) if channels_last else 0
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,))
    loader = BatchLoader(images, labels, args.batch, info, True, device, channels_last=channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    net = torch.compile(model) if args.compile else model
    train_epoch(net, loader, opt, l1=1e-4, amp_dtype=amp_dtype)  # warm-up (and compilation)
    result = train_epoch(net, loader, opt, l1=1e-4, amp_dtype=amp_dtype)
    achieved = result.images_per_second * TRAIN_PASSES * 2 * macs

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{spec.describe()}, {macs / 1e6:.0f} M MACs/image, batch {args.batch}, "
          f"{'channels-last' if channels_last else 'contiguous'}, {'bf16 autocast' if args.amp else 'fp32'}"
          f"{', compiled' if args.compile else ''}{', fused BN' if fused and channels_last else ''}"
          f"{f', {gemm_layers} GEMM convolutions' if gemm_layers else ''} on {name}")
    print("train img/s | training TFLOP/s | matrix-product TFLOP/s (same precision) | fraction of it")
    print(f"{result.images_per_second:,.0f} | {achieved / 1e12:.3f} | {rate / 1e12:.3f} | {achieved / rate:.2f}")


if __name__ == "__main__":
    main()
