"""Early-Bird tickets of attention heads and MLP neurons, on the real Fashion-MNIST: a small timm ViT
and a ConvNeXt of about its size, against Torch-Pruning's own head and MLP pruning, and the gates'
overhead.

Per network, all training through the CLI (AdamW, cosine schedule with warm-up, label smoothing):

* `run --ratios 0.3 0.5 --baseline`: the dense network over the whole schedule (the baseline), where
  each ticket emerges, the pruned networks' accuracy after EB Train (fine-tuned from the ticket over
  the rest of the schedule), their MACs, measured training and inference speed-ups, and EB Train's
  training MACs against train-prune-retrain's;
* Torch-Pruning: the baseline's trained dense network (gates folded in) pruned by Torch-Pruning's
  MetaPruner with magnitude importance: the same fraction of heads within each layer
  (`prune_num_heads`) and of MLP neurons, so the same MACs, then fine-tuned for as many epochs as
  EB Train fine-tuned, from the rate the schedule had at the ticket, decaying by cosine to zero;
* gate overhead: training step time of the dense network with gates over without (alternating
  rounds, the median of each).

    python benchmarks/heads_neurons.py [--nets vit convnext] [--epochs 8] [--train-subset 20000]

torchvision's wheel on a CPU-only torch fails in two registration modules timm does not need: the
commands run through a launcher that stubs them (on a GPU machine with matching wheels it changes
nothing).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

for _module in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_module, types.ModuleType(_module))

import torch  # noqa: E402
from finetune import collect, summary, table  # noqa: E402  (this folder's: the same driver, reader and tables)
from torch import nn  # noqa: E402

LAUNCH = ("import sys, types\n"
          "for m in ('torchvision._meta_registrations', 'torchvision._autograd_registrations'):\n"
          "    sys.modules.setdefault(m, types.ModuleType(m))\n"
          "sys.path.insert(0, {here!r})\n"
          "from earlybird.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")

NETS = {  # patch 4 on 28x28: 49 patches; ConvNeXt with a stem of 1 keeps 28x28 -> 3x3 over four stages
    "vit": ("timm:vit_tiny_patch16_224", ["patch_size=4", "depth=4", "embed_dim=96", "num_heads=4"]),
    "convnext": ("timm:convnext_atto", ["patch_size=1", "dims=(16,32,64,96)", "depths=(1,1,2,1)"]),
}


def earlybird(*argv, log: Path, env: dict | None = None) -> float:
    """One CLI command, its output to ``log``; returns its wall time."""
    t0 = time.perf_counter()
    code = LAUNCH.format(here=str(Path(__file__).parent))
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if done.returncode:
        sys.exit(f"failed ({log}):\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return time.perf_counter() - t0


def tp_model(num_classes: int = 10, in_channels: int = 1):
    """The Torch-Pruning-pruned network saved at $EB_TP_MODEL, as a `module:function` builder."""
    return torch.load(os.environ["EB_TP_MODEL"], weights_only=False)


def torch_pruning(dense_ckpt: Path, ratio: float, macs: float, out: Path) -> dict:
    """Prune the dense network of ``dense_ckpt`` with Torch-Pruning (magnitude importance): as many
    heads of each layer as the ticket at ``ratio`` removes, and the fraction of every MLP's neurons
    that brings the network to ``macs`` of the dense MACs (bisected); save the module."""
    import copy

    import torch_pruning as tp

    from earlybird.cost import count_macs
    from earlybird.gates import fold_gates
    from earlybird.train import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(dense_ckpt)
    dense = fold_gates(model_from_checkpoint(ckpt, dense_ckpt)[0]).eval()
    shape = tuple(ckpt["input_shape"])
    before = count_macs(dense, shape)

    def pruned(neurons: float):
        model = copy.deepcopy(dense)
        attention = [m for m in model.modules() if type(m).__name__ == "Attention"]
        mlps = [m for m in model.modules() if type(m).__name__ == "Mlp"]
        roots = {id(m.qkv) for m in attention} | {id(m.fc1) for m in mlps}
        ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in roots]
        heads = math.floor(attention[0].num_heads * ratio) / attention[0].num_heads if attention else 0.0
        pruner = tp.pruner.MetaPruner(model, torch.randn(2, *shape), importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=neurons, ignored_layers=ignored,
                                      num_heads={m.qkv: m.num_heads for m in attention}, prune_num_heads=True,
                                      prune_head_dims=False, head_pruning_ratio=heads)
        pruner.step()
        for m in attention:  # the attributes timm's forward reads
            m.num_heads = pruner.num_heads[m.qkv]
            m.attn_dim = m.num_heads * m.head_dim
        return model, count_macs(model, shape) / before

    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pruned(mid)[1] > macs else (lo, mid)
    model, reached = pruned(hi)
    torch.save(model, out)
    return {"macs": reached, "neuron_ratio": hi}


def gate_overhead(arch: str, kwargs: list[str], rounds: int = 21, steps: int = 5, batch: int = 128) -> float:
    """Training step time with gates over without, on one batch of Fashion-MNIST's shape."""
    from earlybird import ModelSpec, create_model
    from earlybird.gates import attach_gates
    from earlybird.config import ModelConfig

    spec = ModelSpec(arch, 0, 1.0, 1, 10, 28, ModelConfig(arch=arch, model_kwargs=list(kwargs)).builder_kwargs())
    torch.manual_seed(0)
    plain = create_model(spec)
    gated = create_model(spec)
    gated.load_state_dict(plain.state_dict())
    attach_gates(gated)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    times: dict[str, list[float]] = {"plain": [], "gated": []}

    def train(model) -> float:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return (time.perf_counter() - t0) / steps

    train(plain), train(gated)  # warm-up
    for _ in range(rounds):
        times["plain"].append(train(plain))
        times["gated"].append(train(gated))
    return statistics.median(times["gated"]) / statistics.median(times["plain"])


def one(name: str, work: Path, args) -> dict:
    arch, kwargs = NETS[name]
    data = ["--dataset", "fashion-mnist", "--data", "/usr/share/datasets", "--no-download",
            "--train-subset", args.train_subset, "--batch-size", 128, "--amp", "off", "--seed", 1]

    def recipe(epochs, lr, warmup) -> list:
        return ["--epochs", epochs, "--optimizer", "adamw", "--lr", lr, "--lr-schedule", "cosine",
                "--warmup-epochs", warmup, "--label-smoothing", 0.1]

    run = work / "eb"
    earlybird("run", *data, *recipe(args.epochs, args.lr, 1), "--arch", arch, "--model-kwargs", *kwargs, "--ratios", 0.3, 0.5,
              "--eb-interval", args.interval, "--eb-threshold", args.threshold, "--baseline", "--measure-speed", "--save", run, log=work / "run.log")
    s, base = summary(run), summary(run)["baseline"]
    row = {"net": name, "arch": arch, "kwargs": kwargs, "dense_acc": base["dense_final_test_acc"],
           "dense_macs": s["dense_macs"], "ratios": {}}
    for r in s["ratios"]:
        key = str(r["ratio"])
        if r["eb_epoch"] is None:  # no ticket within the schedule: how close its masks came
            closest = summary(run / "search")["closest"].get(key)
            row["ratios"][key] = {"eb_epoch": None, "closest": closest, "tpr": base["ratios"][key]["final"]}
            continue
        pruned = summary(run / f"pruned-{round(r['ratio'] * 100)}")
        infer = pruned["throughput"]
        biggest = max(infer, key=int) if infer else None
        macs = r["macs"]["after"] / r["macs"]["before"]
        # Torch-Pruning at the same fractions, fine-tuned for EB Train's epochs from the rate the schedule had
        tp_file = work / f"tp-{key}.pt"
        tp = torch_pruning(run / "baseline" / "search" / "checkpoint.pth", r["ratio"], macs, tp_file)
        epochs = r["retrain_epochs"]
        warm, total = 1, int(args.epochs)
        lr = float(args.lr) * 0.5 * (1 + math.cos(math.pi * (r["eb_epoch"] - warm) / (total - warm)))
        tp_dir = work / f"tp-{key}"
        earlybird("search", *data, *recipe(epochs, f"{lr:.6g}", 0), "--arch", "heads_neurons:tp_model", "--full",
                  "--no-sparsity-regularization", "--ratios", 0.5, "--save", tp_dir, log=work / f"tp-{key}.log", env={"EB_TP_MODEL": str(tp_file)})
        row["ratios"][key] = {
            "eb_epoch": r["eb_epoch"], "retrained": r["acc_retrained"], "tpr": base["ratios"][key]["final"],
            "macs": macs, "units": pruned["units"],
            "train_speedup": r["train_speedup_measured"],
            "infer_speedup": infer[biggest]["speedup"] if biggest else None, "infer_batch": biggest,
            "compute_vs_tpr": r["compute_vs_train_prune_retrain"],
            "tp_acc": summary(tp_dir)["final_test_acc"], "tp_macs": tp["macs"], "tp_epochs": epochs,
            "tp_lr": lr}
    row["gate_overhead"] = gate_overhead(arch, kwargs)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--epochs", default="8")
    parser.add_argument("--lr", default="0.001")
    parser.add_argument("--interval", default="0.25", help="--eb-interval of the search")
    parser.add_argument("--threshold", default="0.1", help="--eb-threshold of the search (per epoch)")
    parser.add_argument("--train-subset", default="20000")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    collect(lambda tmp: nets(tmp, args), args.out, lambda rows: report(rows, args))


def nets(tmp: Path, args):
    for name in args.nets:
        work = tmp / name
        work.mkdir()
        yield one(name, work, args)


def report(rows: list[dict], args) -> None:
    print(f"\n{args.epochs} epochs on {args.train_subset} Fashion-MNIST training images (the whole test set), "
          f"AdamW lr {args.lr}, cosine, 1 warm-up epoch, label smoothing 0.1, masks every {args.interval} epoch\n")
    table(["network", "dense", "p", "ticket at epoch", "EB Train", "train-prune-retrain", "Torch-Pruning (same MACs)",
           "heads", "neurons", "MACs", "training speed-up / MAC reduction", "inference speed-up / MAC reduction",
           "EB Train MACs vs TPR"],
          [[row["net"], f"{row['dense_acc']:.2f}%", key, f"{r['eb_epoch']:g}", f"{r['retrained']:.2f}%",
            f"{r['tpr']:.2f}%", f"{r['tp_acc']:.2f}% ({r['tp_macs']:.2f})",
            "-" if "head" not in r["units"] else "{} -> {}".format(*r["units"]["head"]),
            "{} -> {}".format(*r["units"]["neuron"]), f"{r['macs']:.2f}",
            _ratio(r["train_speedup"], r["macs"]), _ratio(r["infer_speedup"], r["macs"]), f"{r['compute_vs_tpr']:.2f}"]
           for row in rows for key, r in row["ratios"].items() if r["eb_epoch"] is not None])
    for row in rows:
        for key, r in row["ratios"].items():
            if r["eb_epoch"] is None:
                print(f"{row['net']} p={key}: no ticket within {args.epochs} epochs (closest window: {r['closest']}); "
                      f"train-prune-retrain {r['tpr']:.2f}%")
    table(["network", "training step with gates / without"], [[row["net"], f"{row['gate_overhead']:.3f}"] for row in rows])


def _ratio(speedup: float | None, macs: float) -> str:
    return "-" if not speedup else f"{speedup:.2f}x / {1 / macs:.2f}x = {speedup * macs:.2f}"


if __name__ == "__main__":
    main()
