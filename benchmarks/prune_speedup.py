"""Dense vs physically pruned network, measured side by side in one run: the MAC ratio next to the
measured ratio of inference latency and training throughput (pruning must give a real speed-up).

Each model runs in the setting the CLI would pick to train it (``--channels-last auto --amp auto``
time the memory formats with and without autocast), with the CLI's allocator setting, fused
batch norm (2x2 max-pools folded into it) and GEMM convolutions on CPUs (``--bn both`` adds every
model again with torch's batch norm, ``--pool both`` with the fused batch norm but torch's max-pools,
``--gemm both`` with torch's convolutions: each ratio against the dense model of its kind),
and the models' timings are interleaved repeat by repeat so that a
slow moment of a shared machine falls on all of them alike.

    python benchmarks/prune_speedup.py [--arch vgg] [--depth 16] [--width 0.5] [--ratios 0.3 0.5 0.7]
    python benchmarks/prune_speedup.py --arch resnet50 --width 1 --ratios 0.5 --image-size 32
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from earlybird import EarlyBird, ModelSpec, create_model, prune_model, resolve_arch
from earlybird.cost import count_macs
from earlybird.config import RuntimeConfig
from earlybird.accel.batch_norm import fuse_batch_norm
from earlybird.prune import prunable_layers
from earlybird.accel.speed import fastest_with_gemm, speed_candidates
from earlybird.accel.tuning import default_autocast_dtype, keep_freed_memory, safe_formats, setting_name


def seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vgg")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--keep-streams", action="store_true")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--amp", default="auto", choices=["auto", "on", "off"], help="autocast (bf16 where the device has it)")
    p.add_argument("--no-keep-memory", action="store_true", help="leave the C allocator as it is")
    p.add_argument("--bn", default="fused", choices=["fused", "torch", "both"],
                   help="batch norm kernel on CPUs: earlybird's fused one (the CLI's default), torch's, or both")
    p.add_argument("--pool", default="on", choices=["on", "off", "both"],
                   help="CPUs, with the fused batch norm: the 2x2 max-pool after it folded in (the CLI's default), "
                        "torch's, or both")
    p.add_argument("--gemm", default="on", choices=["on", "off", "both"],
                   help="CPUs: convolutions partly as im2col + GEMM where timing finds it faster (the CLI's "
                        "default), torch's only, or both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    amp = default_autocast_dtype(device)
    if device.type == "cpu" and not args.no_keep_memory:
        keep_freed_memory()
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
    bns = {"fused": [True], "torch": [False], "both": [True, False]}[args.bn]
    pools = {"on": [True], "off": [False], "both": [True, False]}[args.pool]
    gemms = {"on": [True], "off": [False], "both": [True, False]}[args.gemm]
    # (row suffix, fused batch norm?, its pools?, GEMM convolutions?), all for CPUs; torch's batch norm has no pools
    kinds = [(("" if bn else " torch-bn") + ("" if pool or not bn else " torch-pool") + ("" if g else " torch-conv"),
              bn, pool, g) for bn in bns for pool in (pools if bn else [False]) for g in gemms] \
        if device.type == "cpu" else [("", False, False, False)]

    runs = {}
    for (name, model), (kind, fused, pool, gemm) in [(m, k) for k in kinds for m in models.items()]:
        macs = count_macs(model, (3, size, size))
        model = copy.deepcopy(model).to(device)
        if fused:
            fuse_batch_norm(model, pools=pool)
        formats = safe_formats(model, device) if args.channels_last == "auto" else [args.channels_last == "on"]
        # auto: the precisions the CLI would time here (not bf16 where a probe finds it far slower)
        dtypes = list(dict.fromkeys(d for _, d in speed_candidates(RuntimeConfig(), device, False))) \
            if args.amp == "auto" else [amp if args.amp == "on" else None]
        settings = [(f, d) for f in formats for d in dtypes]
        # as the CLI does: GEMM parts timed per channels-last precision, then the settings with them
        setting = fastest_with_gemm(model, RuntimeConfig(cpu_kernels="on" if gemm else "off"), (3, size, size), 10, args.train_batch,
                                    device, settings)[0]
        cl, amp_dtype = setting
        fmt = torch.channels_last if cl else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        xs = {b: torch.randn(b, 3, size, size, device=device).contiguous(memory_format=fmt) for b in args.batch_sizes}
        x = torch.randn(args.train_batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (args.train_batch,), device=device)

        def autocast(amp_dtype=amp_dtype):
            return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

        def infer(b, model=model, xs=xs, autocast=autocast):
            model.eval()
            with torch.no_grad(), autocast():
                model(xs[b])

        def step(model=model, opt=opt, x=x, y=y, autocast=autocast):
            model.train()
            opt.zero_grad()
            with autocast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        for b in args.batch_sizes:  # warm-up
            infer(b)
        step()
        runs[name + kind] = {"kind": kind, "macs": macs, "setting": setting_name(setting), "infer": infer,
                             "step": step, "lat": {b: [] for b in args.batch_sizes}, "train": []}
    for _ in range(args.repeats):
        for run in runs.values():
            for b in args.batch_sizes:
                run["lat"][b].append(seconds(lambda: run["infer"](b), device))
            run["train"].append(seconds(run["step"], device))

    print(f"{spec.describe()} on {device} ({torch.get_num_threads()} threads), round-to {args.round_to}, "
          f"median of {args.repeats} interleaved repeats")
    big = max(args.batch_sizes)
    print(" | ".join(["model", "setting", "MACs", "MAC ratio"] + [f"infer bs{b}" for b in args.batch_sizes]
                     + [f"infer img/s (bs{big})"]
                     + [f"train img/s (bs{args.train_batch})", "train ratio", "train ratio / MAC ratio"]))
    med = statistics.median
    for name, run in runs.items():
        base = runs["dense" + run["kind"]]
        mac_ratio = base["macs"] / run["macs"]
        train_ratio = med(base["train"]) / med(run["train"])
        row = [name, run["setting"], f"{run['macs'] / 1e6:.1f} M", f"{mac_ratio:.2f}x"]
        row += [f"{med(base['lat'][b]) / med(run['lat'][b]):.2f}x" for b in args.batch_sizes]
        row += [f"{big / med(run['lat'][big]):,.0f}"]
        row += [f"{args.train_batch / med(run['train']):,.0f}", f"{train_ratio:.2f}x", f"{train_ratio / mac_ratio:.2f}"]
        print(" | ".join(row))


if __name__ == "__main__":
    main()
