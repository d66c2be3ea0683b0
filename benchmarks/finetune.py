"""Early-Bird while fine-tuning, on the real Fashion-MNIST: a network pretrained on classes 0-4 is
fine-tuned on classes 5-9, and one pretrained on 5-9 on 0-4, each with the same settings.

Per network and direction, all through the CLI:

* pretrain: `search --full --no-sparsity-regularization` on one half (plain dense training);
* `run --weights PRETRAINED --eb-interval 0.1 --baseline` on the other half: where the ticket emerges
  (epochs into the fine-tune; where an unscaled threshold would have drawn it), the retrained
  accuracy at 30% and 50% against the dense fine-tune (the baseline's dense training over the same
  schedule, L1 included), training time and MACs of Early-Bird fine-tuning (the search, then one
  ratio's retrain) against dense fine-tuning;
* `retrain --rewind pretrained` of the same pruned networks (EarlyBERT's choice);
* from scratch: the same network and schedule on the fine-tuning half, from a random init;
* the same search at other intervals (0.05, 0.2) and at a looser threshold (0.2 per epoch): where
  the tickets emerge.

    python benchmarks/finetune.py [--nets vgg:11:0.25 resnet:18:0.25] [--epochs 3 --lr 0.01]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HALVES = {"0-4": range(0, 5), "5-9": range(5, 10)}


def write_halves(root: Path) -> dict[str, Path]:
    """Fashion-MNIST's classes 0-4 and 5-9 as two folder datasets (train/ and test/ of class folders)."""
    from earlybird.data import load_dataset

    ds = load_dataset("fashion-mnist", "/usr/share/datasets", download=False)
    out = {}
    for name, classes in HALVES.items():
        out[name] = root / name
        for split, x, y in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
            for i, (img, label) in enumerate(zip(x[:, 0].numpy(), y.tolist())):
                if label in classes:
                    folder = out[name] / split / f"class{label}"
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
    return out


def earlybird(*argv, log: Path) -> float:
    """Run one command; its output goes to ``log``; returns its wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "earlybird", *map(str, argv)], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({log}):\n" + "".join(log.read_text().splitlines(True)[-15:]))
    return time.perf_counter() - t0


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def one(net: str, source: Path, target: Path, work: Path, args) -> dict:
    arch, depth, width = net.split(":")
    model = ["--arch", arch, "--depth", depth, "--width", width, "--seed", "1"]
    common = ["--dataset", "folder", "--data", target, *model, "--epochs", args.epochs, "--lr", args.lr]
    pre = work / "pretrained"
    earlybird("search", "--dataset", "folder", "--data", source, *model, "--epochs", args.pretrain_epochs,
              "--full", "--no-sparsity-regularization", "--ratios", "0.5", "--save", pre, log=work / "pretrain.log")
    weights = ["--weights", pre / "checkpoint.pth"]
    run = work / "eb"
    earlybird("run", *common, *weights, "--eb-interval", args.interval, "--ratios", "0.3", "0.5", "--baseline",
              "--save", run, log=work / "run.log")
    s, found = summary(run), summary(run / "search")
    base = s["baseline"]
    dense_s = found["train_s"] + summary(run / "baseline" / "search")["train_s"]
    row = {"net": net, "pretrained_acc": summary(pre)["final_test_acc"], "dense_acc": base["dense_final_test_acc"],
           "dense_train_s": dense_s, "search_train_s": found["train_s"], "ratios": {}, **unscaled(run)}
    for r in s["ratios"]:
        key = str(r["ratio"])
        if r["eb_epoch"] is None:  # no ticket within the fine-tune: nothing to retrain
            continue
        rewound = work / f"rewind-{key}"
        earlybird("retrain", "--model", run / f"pruned-{round(r['ratio'] * 100)}" / "pruned.pth", "--dataset", "folder",
                  "--data", target, "--epochs", args.epochs, "--lr", args.lr, "--rewind", "pretrained",
                  "--save", rewound, log=work / f"rewind-{key}.log")
        row["ratios"][key] = {
            "eb_epoch": r["eb_epoch"], "retrained": r["acc_retrained"], "rewound": summary(rewound)["final_test_acc"],
            "tpr": base["ratios"][key]["final"], "macs": r["macs"]["after"] / r["macs"]["before"],
            "vs_dense_macs": r["compute_vs_dense_only"], "eb_train_s": found["train_s"] + r["retrain_train_s"]}
    scratch = work / "scratch"
    earlybird("search", *common, "--full", "--no-sparsity-regularization", "--ratios", "0.5", "--save", scratch,
              log=work / "scratch.log")
    row["scratch_acc"] = summary(scratch)["final_test_acc"]
    row["settings"] = {f"interval {args.interval}": _drawn(found)}
    for flag, values in (("interval", args.other_intervals), ("threshold", args.other_thresholds)):
        for value in values:
            other = work / f"{flag}-{value}"
            interval = value if flag == "interval" else args.interval
            earlybird("search", *common, *weights, "--eb-interval", interval, "--ratios", "0.3", "0.5",
                      *(["--eb-threshold", value] if flag == "threshold" else []), "--save", other,
                      log=work / f"{flag}-{value}.log")
            row["settings"][f"{flag} {value}"] = _drawn(summary(other))
    return row


def unscaled(run: Path) -> dict:
    """From the dense fine-tune's masks (the baseline carries the search through the schedule):
    the distances between consecutive draws in the first epoch, and where each ratio's ticket would
    have emerged had the threshold not been scaled with the interval."""
    from earlybird.masks import mask_distance
    from earlybird.report import load_run

    data = load_run(run)
    out = {"consecutive_first_epoch": {}, "unscaled_at": {}}
    for r in data.ratios:
        masks, at = data.masks(r), data.positions[1:]
        steps = [mask_distance(a, b) for a, b, p in zip(masks[1:], masks, at[1:]) if p <= 1]
        out["consecutive_first_epoch"][str(r)] = [round(min(steps), 3), round(max(steps), 3)]
        settled = [p for p, d in zip(at, data.window_distances(r)) if len(d) == data.window - 1
                   and max(d) <= data.threshold]
        out["unscaled_at"][str(r)] = settled[0] if settled else None
    return out


def _drawn(found: dict) -> dict:
    """ratio -> epoch of its ticket (None: no ticket), and where the first window was full."""
    return {**{r: (found["tickets"].get(r) or {}).get("epoch") for r in ("0.3", "0.5")},
            "first_full": round(found["window"] * found["interval_epochs"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=["vgg:11:0.25", "resnet:18:0.25"], help="arch:depth:width")
    parser.add_argument("--pretrain-epochs", default="4")
    parser.add_argument("--epochs", default="3")
    parser.add_argument("--lr", default="0.01")
    parser.add_argument("--interval", default="0.1")
    parser.add_argument("--other-intervals", nargs="*", default=["0.05", "0.2"])
    parser.add_argument("--other-thresholds", nargs="*", default=["0.2"])
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    collect(lambda work: directions(work, args), args.out, lambda rows: report(rows, args))


def directions(tmp: Path, args):
    """Each network fine-tuned each way: one row per network and direction."""
    halves = write_halves(tmp / "data")
    for net in args.nets:
        for source, target in (("0-4", "5-9"), ("5-9", "0-4")):
            work = tmp / f"{net.replace(':', '-')}-{source}"
            work.mkdir()
            row = one(net, halves[source], halves[target], work, args)
            row["direction"] = f"{source} -> {target}"
            yield row


def collect(produce, out: Path | None, report) -> None:
    """The rows ``produce(work)`` yields in a temporary work directory (with its own earlybird cache),
    each printed as JSON as it comes; then written to ``out`` where given, and reported."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("EARLYBIRD_CACHE_DIR", str(tmp / "cache"))
        for row in produce(tmp):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if out:
        out.write_text(json.dumps(rows, indent=1))
    report(rows)


def report(rows: list[dict], args) -> None:
    print(f"\nFine-tuning for {args.epochs} epochs at lr {args.lr} (pretrained {args.pretrain_epochs} epochs at the "
          f"default lr), masks every {args.interval} epoch, window 5, --eb-threshold 0.1 per epoch\n")
    table(["network", "classes", "pretrained", "dense fine-tune", "from scratch", "p", "ticket at epoch",
           "EB retrained", "rewound to pretrained", "train-prune-retrain", "MACs", "training MACs vs dense fine-tune"],
          [[row["net"], row["direction"], f"{row['pretrained_acc']:.2f}%", f"{row['dense_acc']:.2f}%",
            f"{row['scratch_acc']:.2f}%", key, f"{r['eb_epoch']:.2f}", f"{r['retrained']:.2f}%", f"{r['rewound']:.2f}%",
            f"{r['tpr']:.2f}%", f"{r['macs']:.2f}", f"{r['vs_dense_macs']:.2f}"]
           for row in rows for key, r in row["ratios"].items()])
    table(["network", "classes", "p", "distance of consecutive masks in the first epoch", "unscaled 0.1 would draw at",
           "scaled (the ticket) at"],
          [[row["net"], row["direction"], key, "{:.3f}-{:.3f}".format(*row["consecutive_first_epoch"][key]),
            _at(row["unscaled_at"][key]), _at(r["eb_epoch"])] for row in rows for key, r in row["ratios"].items()])
    table(["network", "classes", "p", "Early-Bird fine-tuning: search + retrain, training s", "dense fine-tune, s",
           "ratio", "training MACs ratio"],
          [[row["net"], row["direction"], key, f"{row['search_train_s']:.1f} + {r['eb_train_s'] - row['search_train_s']:.1f}",
            f"{row['dense_train_s']:.1f}", f"{r['eb_train_s'] / row['dense_train_s']:.2f}", f"{r['vs_dense_macs']:.2f}"]
           for row in rows for key, r in row["ratios"].items()])
    table(["network", "classes", "search", "first full window at", "p=0.3 ticket at", "p=0.5 ticket at"],
          [[row["net"], row["direction"], setting, t["first_full"], _at(t["0.3"]), _at(t["0.5"])]
           for row in rows for setting, t in row["settings"].items()])


def _at(epoch: float | None) -> str:
    return "-" if epoch is None else f"{epoch:.2f}"


def table(head: list[str], rows: list[list]) -> None:
    print("\n| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for cells in rows:
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
