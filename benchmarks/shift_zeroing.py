"""What zeroing the shifts of gated channels costs, on a finished `earlybird run`.

A removed channel of a squeeze-and-excitation block reaches the next layer multiplied by a
per-sample gate: its constant (the BN shift through the activation) cannot be folded, so the
pruned network equals the masked one only where that channel's shift is zeroed too (it then emits
act(0) = 0). Per ticket of the run, the test accuracy of:

- the dense network at the ticket,
- the naive masked network: the pruned channels' scales zeroed, their shifts left,
- ``plan.masked``: the gated channels' shifts zeroed as well (what the pruned network equals),
- the pruned network before retraining, and after (from the run's summaries).

    python benchmarks/shift_zeroing.py RUN_DIR [--data DIR]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from earlybird import PrunePlan, apply_mask
from earlybird.data import load_dataset, loader_of
from earlybird.stages.rundir import RunDir, label
from earlybird.train import load_checkpoint, model_from_checkpoint
from earlybird.train.loop import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="the --save folder of a finished `earlybird run`")
    p.add_argument("--data", default="data", help="where the run's dataset is (as its --data)")
    args = p.parse_args()
    run = RunDir(args.run)
    summary = run.summary()
    found = run.search().summary()
    dataset = None
    print("| p | EB epoch | dense | naive masked | plan.masked | pruned, before retraining | retrained | "
          "shift-zeroed channels |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary["ratios"]:
        if row["eb_epoch"] is None:
            continue
        ticket = load_checkpoint(run.search() / found["tickets"][str(row["ratio"])]["path"])
        plan = PrunePlan.from_dict(load_checkpoint(run.pruned(row["ratio"]) / "pruned.pth")["plan"])
        dense, _, _ = model_from_checkpoint(ticket)
        if dataset is None:
            dataset = load_dataset(ticket["dataset"], args.data, download=False)
            test = loader_of(dataset, False, 1000)
        naive = evaluate(apply_mask(dense, plan.masks(dense)).eval(), test).top1
        masked = evaluate(plan.masked(dense).eval(), test).top1
        pruned = json.loads((run.pruned(row["ratio"]) / "summary.json").read_text())["test_acc"]
        print(f"| {label(row['ratio'])} | {row['eb_epoch']} | {pruned['dense']:.2f}% | {naive:.2f}% | {masked:.2f}% | "
              f"{pruned['pruned']:.2f}% | {row['acc_retrained']:.2f}% | "
              f"{sum(len(c) for c in plan.zeroed.values())} in {len(plan.zeroed)} BNs |")


if __name__ == "__main__":
    main()
