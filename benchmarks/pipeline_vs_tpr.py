"""The whole Early-Bird pipeline against train-prune-retrain with the same schedule and seed,
measured side by side in one run (`earlybird run --baseline`): training time and training MACs.

    python benchmarks/pipeline_vs_tpr.py [--save runs/bench-pipeline] [earlybird run flags ...]

Defaults: the README demo's setup (Fashion-MNIST, VGG11 width 0.25, 26 epochs, decays at 6 and 18,
ratios 0.5 and 0.7). Any further flags are passed to `earlybird run`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DEFAULTS = ["--dataset", "fashion-mnist", "--arch", "vgg", "--depth", "11", "--width", "0.25", "--epochs", "26",
            "--schedule", "6", "18", "--batch-size", "256", "--ratios", "0.5", "0.7"]


def main() -> None:
    argv = sys.argv[1:]
    save = Path(argv[argv.index("--save") + 1]) if "--save" in argv else Path("runs/bench-pipeline")
    if "--save" not in argv:
        argv += ["--save", str(save)]
    subprocess.check_call([sys.executable, "-m", "earlybird", "run", *DEFAULTS, *argv, "--baseline"])
    s = json.loads((save / "summary.json").read_text())
    b = s["baseline"]
    print("\npipeline | training time | training MACs | time ratio | MAC ratio")
    print(f"train-prune-retrain | {b['train_s']:.0f} s | {b['train_macs']:.3g} | 1.00x | 1.00x")
    print(f"Early-Bird | {s['train_s']:.0f} s | {s['total_train_macs']:.3g} | {s['train_s'] / b['train_s']:.2f}x | "
          f"{s['total_train_macs'] / b['train_macs']:.2f}x")
    print("ratio | train-prune-retrain accuracy | Early-Bird accuracy")
    for row in s["ratios"]:
        tpr = b["ratios"].get(str(row["ratio"]))
        if tpr and row.get("eb_epoch") is not None:
            print(f"{row['ratio']:g} | {tpr['final']:.2f}% | {row['acc_retrained']:.2f}%")


if __name__ == "__main__":
    main()
