"""earlybird's pruning engine and Torch-Pruning side by side on the model zoos people use.

Every batch-norm classification model of torchvision (where installed) and a sample of timm's BN
CNNs (where installed): random BN scales, a 50% global mask over ``prunable_layers``, then
``prune_model``; against it Torch-Pruning's ``BNScaleImportance`` with a global ratio of 0.5. One
row a model: ok or the error's first line, the MAC reduction, earlybird's largest pruned-vs-masked
difference (relative to the output's size) on the planning batch and on inputs of other statistics
(scaled, shifted, smooth), how many BN channels were shift-zeroed, and the time to plan and prune.
earlybird's side runs in float64, so that the difference measures the engine, not float32 rounding
amplified through a random network.

    python benchmarks/zoo.py [--source torchvision timm] [--models NAME ...] [--max-params 150]
                             [--tools earlybird torch-pruning] [--timeout 300]

torchvision's wheel on a CPU-only torch may be a CUDA build: its import then fails in
``torchvision._meta_registrations`` ("operator torchvision::nms does not exist"). This script
replaces that module and ``torchvision._autograd_registrations`` by empty ones first, which is
enough for ``torchvision.models`` (and for timm on top of it); earlybird itself never does this.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
import time
import traceback
import types

import torch
from torch import nn

from earlybird import EarlyBird, prune_model
from earlybird.cost import count_macs
from earlybird.errors import EarlyBirdError
from earlybird.prune import channel_ties, prunable_layers
from earlybird.prune.engine import other_inputs

# models whose forward needs a larger input than --image-size (inception_v3 reduces 64x64 to nothing)
MIN_SIZE = {"inception_v3": 96, "maxvit_t": 224}
# timm's BN CNNs of every structure the engine meets (BatchNormAct2d, grouped and SE blocks, splits)
TIMM = ["efficientnet_b0", "mobilenetv3_large_100", "regnety_016", "densenet121", "cspresnet50", "rexnet_100",
        "xception41", "ese_vovnet19b_dw", "gernet_s", "lcnet_050", "mixnet_s", "tresnet_m", "skresnet18",
        "resnest14d", "res2net50_26w_4s", "ghostnet_100", "dpn68", "ecaresnet50d", "resnet18", "resnet50d",
        "seresnext26d_32x4d", "mobilenetv2_100", "efficientnet_lite0", "hrnet_w18_small"]


def import_torchvision():
    try:
        import torchvision  # noqa: F401
    except RuntimeError:  # a CUDA build of torchvision on a CPU torch: see the module doc
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            sys.modules[name] = types.ModuleType(name)
        import torchvision  # noqa: F401
    import torchvision.models as models
    return models


def zoo(sources: list[str], only: list[str] | None) -> list[tuple[str, callable]]:
    found = []
    if "torchvision" in sources:
        try:
            models = import_torchvision()
            for name in models.list_models(module=models):
                found.append((f"torchvision:{name}", lambda name=name: models.get_model(name, weights=None,
                                                                                          num_classes=10)))
        except ImportError:
            print("torchvision is not installed: its models are left out")
    if "timm" in sources:
        try:
            try:
                import_torchvision()  # timm imports torchvision where it is installed
            except ImportError:
                pass
            import timm
            for name in TIMM:
                found.append((f"timm:{name}", lambda name=name: timm.create_model(name, pretrained=False, num_classes=10)))
        except ImportError:
            print("timm is not installed: its models are left out")
    return [(n, b) for n, b in found if not only or n.split(":", 1)[1] in only or n in only]


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random scales, shifts and statistics in every BN, as a trained network has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g))
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


class TimedOut(BaseException):  # not an Exception: the tools' own handlers must not take it for a failure
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Stop one model's work after ``seconds`` (SIGALRM: the main thread, between Python bytecodes)."""
    def expire(signum, frame):
        raise TimedOut(f"over {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def limited(seconds: int, tool, model: nn.Module, x: torch.Tensor) -> dict:
    try:
        with time_limit(seconds):
            return tool(model, x)
    except TimedOut as exc:
        return {"ok": False, "error": f"timed out ({exc})", "seconds": seconds}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:110] if text else ''}"


def ours(model: nn.Module, x: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    try:
        layers = prunable_layers(model, x)
        if not layers:
            return {"ok": False, "error": "no prunable BN", "seconds": time.perf_counter() - t0}
        detector = EarlyBird(model, [0.5], layers=layers, ties=channel_ties(model, x))  # as `earlybird search`
        detector.step()
        pruned, plan = prune_model(model, detector.layer_masks(0.5, detector.mask(0.5)), x)
    except Exception as exc:  # noqa: BLE001 - the table reports every failure
        tb = not isinstance(exc, EarlyBirdError)
        return {"ok": False, "error": ("TRACEBACK " if tb else "") + first_line(exc),
                "where": traceback.format_exc().splitlines()[-3].strip() if tb else "",
                "seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    masked = plan.masked(model).eval()
    with torch.no_grad():
        diffs = []
        for inputs in (x, 2 * torch.randn_like(x) + 1, *other_inputs(x, seed=1)):
            want, got = masked(inputs), pruned.eval()(inputs)
            diffs.append(((got - want).abs().max() / (1 + want.abs().max())).item())
    shape = tuple(x.shape[1:])
    return {"ok": True, "macs": count_macs(model, shape) / count_macs(pruned, shape), "diff": diffs[0],
            "other": max(diffs[1:]), "zeroed": len(plan.zeroed), "seconds": seconds}


def torch_pruning(model: nn.Module, x: torch.Tensor) -> dict:
    import torch_pruning as tp

    t0 = time.perf_counter()
    try:
        heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10]
        heads += [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 10]
        before = count_macs(model, tuple(x.shape[1:]))
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.BNScaleImportance(), pruning_ratio=0.5,
                                      global_pruning=True, ignored_layers=heads)
        pruner.step()
        with torch.no_grad():
            model.eval()(x)
        return {"ok": True, "macs": before / count_macs(model, tuple(x.shape[1:])),
                "seconds": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": first_line(exc), "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", nargs="+", default=["torchvision", "timm"], choices=["torchvision", "timm"])
    p.add_argument("--models", nargs="*", help="names (with or without the source: prefix)")
    p.add_argument("--max-params", type=float, default=150, help="leave out models of more million parameters")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--tools", nargs="+", default=["earlybird", "torch-pruning"], choices=["earlybird", "torch-pruning"])
    p.add_argument("--timeout", type=int, default=300, help="seconds per model and tool")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input 2x3x{args.image_size}x{args.image_size}, "
          "random BN scales, 50% global mask")
    print("| model | earlybird | MACs ÷ | max rel. diff: planning batch | other inputs | shift-zeroed BNs | plan+prune s "
          "| Torch-Pruning | MACs ÷ |")
    print("|---|---|---|---|---|---|---|---|---|")
    counts = {"ours": 0, "tp": 0, "bn": 0, "traceback": 0}
    for name, build in zoo(args.source, args.models):
        try:
            model = build().eval()
        except Exception as exc:  # noqa: BLE001
            print(f"| {name} | cannot build: {first_line(exc)} | | | | | | | |")
            continue
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            continue
        params = sum(p.numel() for p in model.parameters()) / 1e6
        if params > args.max_params:
            print(f"| {name} | left out: {params:.0f} M parameters (--max-params) | | | | | | | |")
            continue
        counts["bn"] += 1
        randomize_bn(model)
        size = max(args.image_size, MIN_SIZE.get(name.split(":", 1)[1], 0))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        a = limited(args.timeout, ours, copy.deepcopy(model).double(), x.double()) if "earlybird" in args.tools \
            else {"ok": None}
        b = limited(args.timeout, torch_pruning, copy.deepcopy(model), x) if "torch-pruning" in args.tools else {"ok": None}
        counts["ours"] += bool(a["ok"])
        counts["tp"] += bool(b["ok"])
        counts["traceback"] += a["ok"] is False and a["error"].startswith("TRACEBACK")
        ours_cells = ("- | | | | |" if a["ok"] is None else
                      f"ok | {a['macs']:.2f} | {a['diff']:.1e} | {a['other']:.1e} | {a['zeroed']} | {a['seconds']:.1f}"
                      if a["ok"] else f"{a['error']} {a.get('where', '')} | | | | | {a['seconds']:.1f}")
        tp_cells = ("-" if b["ok"] is None else f"ok | {b['macs']:.2f}" if b["ok"] else f"{b['error']} |")
        print(f"| {name} | {ours_cells} | {tp_cells} |", flush=True)
    print(f"\nBN models: {counts['bn']}; earlybird pruned {counts['ours']}, Torch-Pruning {counts['tp']}; "
          f"engine tracebacks: {counts['traceback']}")


if __name__ == "__main__":
    main()
