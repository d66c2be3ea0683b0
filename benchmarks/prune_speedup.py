"""Dense vs physically pruned network, measured side by side in one run: the MAC ratio next to the
measured ratio of inference latency and training throughput (pruning must give a real speed-up).

    python benchmarks/prune_speedup.py [--arch vgg] [--depth 16] [--width 0.5] [--ratios 0.3 0.5 0.7]
    python benchmarks/prune_speedup.py --arch resnet50 --width 1 --ratios 0.5 --image-size 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from earlybird import EarlyBird, ModelSpec, create_model, prune_model, resolve_arch
from earlybird.prune import prunable_layers
from earlybird.cost import count_macs


def timed(fn, repeats: int, device) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vgg")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--keep-streams", action="store_true")
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    arch, depth = resolve_arch(args.arch, args.depth)
    size = args.image_size
    spec = ModelSpec(arch, depth, args.width, 3, 10, size)
    dense = create_model(spec).eval()
    with torch.no_grad():  # trained-looking, unequal gammas so the global threshold prunes unevenly
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight))
    example = torch.randn(2, 3, size, size)
    detector = EarlyBird(dense, args.ratios, layers=prunable_layers(dense, example, args.keep_streams))
    detector.step()
    models = {"dense": dense}
    for r in detector.ratios:
        mask = detector.layer_masks(r, detector.mask(r))
        models[f"p={r:g}"] = prune_model(dense, mask, example, args.keep_streams, args.round_to)[0]

    def infer(model, bs):
        x = torch.randn(bs, 3, size, size, device=device)
        return lambda: model(x)

    def train_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x = torch.randn(args.train_batch, 3, size, size, device=device)
        y = torch.randint(0, 10, (args.train_batch,), device=device)

        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    print(f"{spec.describe()} on {device} ({torch.get_num_threads()} threads), median of {args.repeats}")
    header = ["model", "MACs", "MAC ratio"] + [f"infer bs{b} ratio" for b in args.batch_sizes] + ["train img/s", "train ratio"]
    print(" | ".join(header))
    base = {}
    for name, model in models.items():
        model = model.to(device)
        macs = count_macs(model, (3, size, size))
        row = [name, f"{macs / 1e6:.1f}M"]
        model.eval()
        with torch.no_grad():
            lat = {b: timed(infer(model, b), args.repeats, device) for b in args.batch_sizes}
        model.train()
        step = timed(train_step(model), args.repeats, device)
        if name == "dense":
            base = {"macs": macs, "lat": lat, "step": step}
        row.append(f"{base['macs'] / macs:.2f}x")
        row += [f"{base['lat'][b] / lat[b]:.2f}x" for b in args.batch_sizes]
        row += [f"{args.train_batch / step:.0f}", f"{base['step'] / step:.2f}x"]
        print(" | ".join(row))


if __name__ == "__main__":
    main()
