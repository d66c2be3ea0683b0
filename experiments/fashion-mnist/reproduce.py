"""Early-Bird on Fashion-MNIST, reproduced: for each seed, dense training, EB Train and EB Train
(re-init) at p = 0.3 and 0.5, and train-prune-retrain with the same schedule, with a VGG sized for a
2-core CPU. Writes table.md (network-slimming style: one row per stage, mean +- std over seeds),
results.json, the run directories (metrics, summaries), logs/, and the figures of the first seed.

    python experiments/fashion-mnist/reproduce.py [--seeds 1 2 3] [--out experiments/fashion-mnist/runs]

Every step is an `earlybird` command (the log of each is kept); a finished step is not run again,
so an interrupted reproduction continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = ["--dataset", "fashion-mnist", "--arch", "vgg", "--depth", "11", "--width", "0.25"]
# the committed results were trained in fp32 (before --amp auto timed bf16 autocast as faster here)
SCHEDULE = ["--epochs", "20", "--schedule", "5", "14", "--batch-size", "256", "--amp", "off"]
RATIOS = ["0.3", "0.5"]


def earlybird(log: Path, *argv: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "earlybird", *argv], stdout=f, stderr=subprocess.STDOUT)
    print(f"  {' '.join(argv[:1])} ... -> {log.name}: exit {code}, {time.time() - start:.0f}s", flush=True)
    if code:
        sys.exit(f"{log} ended with exit code {code}")


def run_seed(out: Path, logs: Path, seed: int) -> None:
    s = ["--seed", str(seed)]
    run = out / f"eb-seed{seed}"
    if not (run / "summary.json").exists():  # EB Train (fine-tune) + measured train-prune-retrain
        earlybird(logs / f"eb-seed{seed}.log", "run", *MODEL, *SCHEDULE, *s, "--ratios", *RATIOS, "--baseline",
                  "--round-to", "1", "--latency-batches", "--save", str(run))  # the paper's exact ratios
    for r in RATIOS:
        tag = round(float(r) * 100)
        reinit = out / f"reinit-{tag}-seed{seed}"
        if not (reinit / "summary.json").exists():  # EB Train (re-init): the ticket's architecture from scratch
            earlybird(logs / f"reinit-{tag}-seed{seed}.log", "retrain", *SCHEDULE, *s, "--reinit", "--model",
                      str(run / f"pruned-{tag}" / "pruned.pth"), "--save", str(reinit), "--force")
    dense = out / f"dense-seed{seed}"
    if not (dense / "summary.json").exists():  # plain dense training, no sparsity: the accuracy to match
        earlybird(logs / f"dense-seed{seed}.log", "search", *MODEL, *SCHEDULE, *s, "--no-sparsity-regularization",
                  "--full", "--ratios", *RATIOS, "--save", str(dense), "--force")


def complete(out: Path, seed: int) -> bool:
    """Every run of ``seed`` finished (the table uses only complete seeds)."""
    parts = [f"eb-seed{seed}", f"dense-seed{seed}"] + [f"reinit-{round(float(r) * 100)}-seed{seed}" for r in RATIOS]
    return all((out / p / "summary.json").exists() for p in parts)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def collect(out: Path, seeds: list[int]) -> dict:
    rows: dict[str, dict[str, list]] = {}

    def add(stage: str, **values):
        for k, v in values.items():
            rows.setdefault(stage, {}).setdefault(k, []).append(v)

    for seed in seeds:
        run = out / f"eb-seed{seed}"
        summary = load(run / "summary.json")
        dense = load(out / f"dense-seed{seed}" / "summary.json")
        base = summary["baseline"]
        dense_macs, images = summary["dense_macs"], load(run / "search" / "summary.json")["train_images"]
        epoch_macs = 3 * dense_macs * images
        n = summary["schedule_epochs"]
        add("Dense baseline (no sparsity)", acc=dense["final_test_acc"], params=summary["dense_params"],
            macs=dense_macs, train_macs=n * epoch_macs, eb_epoch=None)
        add("Trained with sparsity (L1 on BN scales)", acc=base["dense_final_test_acc"],
            params=summary["dense_params"], macs=dense_macs, train_macs=n * epoch_macs, eb_epoch=None)
        for row in summary["ratios"]:
            r, tag = row["ratio"], round(row["ratio"] * 100)
            b = base["ratios"][str(r)]
            pr = load(run / "baseline" / f"pruned-{tag}" / "summary.json")
            add(f"p={r:g}: pruned at the end, before fine-tuning", acc=pr["test_acc"]["pruned"], params=b["params"],
                macs=b["macs"], train_macs=n * epoch_macs, eb_epoch=None)
            add(f"p={r:g}: train-prune-retrain (fine-tuned)", acc=b["final"], params=b["params"], macs=b["macs"],
                train_macs=n * epoch_macs + n * 3 * b["macs"] * images, eb_epoch=None)
            if row.get("eb_epoch") is None:
                continue
            add(f"p={r:g}: EB ticket, pruned, before retraining", acc=row["acc_pruned"], params=row["params"]["after"],
                macs=row["macs"]["after"], train_macs=row["eb_epoch"] * epoch_macs, eb_epoch=row["eb_epoch"])
            add(f"p={r:g}: EB Train (fine-tuned)", acc=row["acc_retrained"], params=row["params"]["after"],
                macs=row["macs"]["after"], train_macs=row["train_macs"]["eb"], eb_epoch=row["eb_epoch"])
            reinit = load(out / f"reinit-{tag}-seed{seed}" / "summary.json")
            add(f"p={r:g}: EB Train (re-init)", acc=reinit["final_test_acc"], params=row["params"]["after"],
                macs=row["macs"]["after"], train_macs=row["eb_epoch"] * epoch_macs + n * 3 * row["macs"]["after"] * images,
                eb_epoch=row["eb_epoch"])
    return rows


def mean_std(values: list, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: dict) -> str:
    dense = statistics.mean(rows["Dense baseline (no sparsity)"]["train_macs"])
    head = ["stage", "test accuracy (%)", "params", "MACs / image", "training MACs", "× dense training", "EB epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, v in rows.items():
        macs = statistics.mean(v["train_macs"])
        lines.append(f"| {stage} | {mean_std(v['acc'])} (n={len(v['acc'])}) | {statistics.mean(v['params']):,.0f} | "
                     f"{statistics.mean(v['macs']) / 1e6:.2f} M | {macs:.3g} | {macs / dense:.2f} | "
                     f"{mean_std(v['eb_epoch'], 1)} |")
    return "\n".join(lines)


def verdict(rows: dict) -> str:
    """The goals of the issue, answered from the numbers."""
    dense = statistics.mean(rows["Dense baseline (no sparsity)"]["acc"])
    out = []
    for r in RATIOS:
        eb, tpr = rows.get(f"p={float(r):g}: EB Train (fine-tuned)"), rows.get(f"p={float(r):g}: train-prune-retrain (fine-tuned)")
        if not eb or not tpr:
            continue
        gap = statistics.mean(eb["acc"]) - dense
        saving = statistics.mean(tpr["train_macs"]) / statistics.mean(eb["train_macs"])
        out.append(f"- p = {float(r):g}: EB Train is {gap:+.2f} points from the dense baseline "
                   f"({'within' if abs(gap) <= 0.3 else 'outside'} 0.3) and {statistics.mean(eb['acc']) - statistics.mean(tpr['acc']):+.2f} "
                   f"from train-prune-retrain, with {saving:.2f}x less training compute than train-prune-retrain.")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default=str(HERE / "runs"))
    p.add_argument("--table-only", action="store_true", help="only collect the seeds that are complete")
    args = p.parse_args()
    out = Path(args.out)
    logs = HERE / "logs"
    for seed in [] if args.table_only else args.seeds:
        print(f"seed {seed}", flush=True)
        run_seed(out, logs, seed)
    done = [s for s in args.seeds if complete(out, s)]
    rows = collect(out, done)
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "table.md").write_text(table(rows) + "\n\n" + verdict(rows) + "\n")
    first = out / f"eb-seed{done[0]}"
    subprocess.check_call([sys.executable, "-m", "earlybird", "report", str(first), "--out", str(HERE / "figures")])
    shutil.copy2(first / "summary.txt", HERE / f"summary-seed{done[0]}.txt")
    print(table(rows))
    print(verdict(rows))


if __name__ == "__main__":
    main()
