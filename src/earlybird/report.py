"""`earlybird report RUN_DIR`: the pictures of an Early-Bird run and a Markdown page around them.

* heatmap.png: the mask-distance matrix of every draw (each epoch, or each --eb-interval) against
  every other, one panel per ratio, EB tickets marked;
* distances.png: the distance of each draw's mask to the previous one, and the largest distance in
  the detection window, against the bound (for a budget target such as macs30, whose ratio is
  solved anew at every draw, the window's distances as the search recorded them);
* curves.png: train/test accuracy and loss of the search and of every retrain;
* gammas.png: the |gamma| histogram at a few epochs;
* channels.png: kept channels per layer of each ticket, budget tickets included;
* report.md: the tickets, accuracies, sizes and the cost table, with the figures.

Works on a `run` directory or on a single `search` directory (headless matplotlib). The heat-map
covers the epochs the search trained: use `search --full`, or `run --baseline`, whose dense
training continues the search over the whole schedule (the report then draws from it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import RunDirError
from .masks import UNIT_WORDS, ChannelIndex, channel_mask, distance_matrix, mask_distance
from .progress import format_ratio, format_seconds
from .rules import Rule, make_rule
from .stages.rundir import RunDir, label as target_label
from .train import load_checkpoint


@dataclass
class RunData:
    root: Path
    search_dir: Path
    scores: torch.Tensor  # (draws + 1) x channels: the initial importance, then at every draw
    positions: list[float]  # the epochs trained at each row of scores (0 first)
    layer_sizes: list[int]
    layer_names: list[str]
    ratios: list[float]
    min_channels: int
    threshold: float
    window: int
    rule: Rule
    importance: str
    ties: list[list[int]]
    emerged: dict[float | str, float]  # ratios and budget keys (macs30) alike: epochs trained
    search_metrics: list[dict]
    budgets: list[str] = field(default_factory=list)
    tickets: dict[str, torch.Tensor] = field(default_factory=dict)  # budget key -> its ticket's mask
    retrain_metrics: dict[float | str, list[dict]] = field(default_factory=dict)
    pruned: dict[float | str, dict] = field(default_factory=dict)
    summary: dict | None = None
    interval: float = 1.0  # epochs between draws: the window's masks may differ by threshold x interval
    schedule_epochs: int | None = None  # the search's schedule, once it finished
    kinds: list[str] = field(default_factory=list)  # per layer: channel, head or neuron (empty: all channels)
    kind_ratios: dict[str, float] = field(default_factory=dict)  # heads or neurons at a fixed ratio

    @property
    def targets(self) -> list[float | str]:
        return [*self.ratios, *self.budgets]

    @property
    def unit_words(self) -> str:
        """What the masks' positions are, for the figures' axes: channels, or channels, heads and neurons."""
        return ", ".join(UNIT_WORDS[k].split()[-1] for k in dict.fromkeys(self.kinds)) if self.kinds else "channels"

    @property
    def epochs(self) -> float:
        return self.positions[-1]

    @property
    def bound(self) -> float:
        return self.threshold * self.interval

    def draw(self, position: float) -> int:
        """The index in ``masks`` of the draw at ``position`` (epochs trained)."""
        return min(range(1, len(self.positions)), key=lambda i: abs(self.positions[i] - position)) - 1

    def masks(self, ratio: float) -> list[torch.Tensor]:
        """The mask of every draw after the first (1..) at ``ratio``, as the detector computed it."""
        return [channel_mask(g, ratio, self.layer_sizes, self.min_channels, self.ties, self.kinds, self.kind_ratios)
                for g in self.scores[1:]]

    def window_distances(self, ratio: float) -> list[list[float]]:
        """Per draw, the distances the rule bounds over the window that ends there (fewer while
        the window fills)."""
        masks = self.masks(ratio)
        return [self.rule.distances(masks[max(0, e + 1 - self.window):e + 1]) for e in range(len(masks))]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def load_run(root: str | Path) -> RunData:
    run = RunDir(Path(root))
    search = run.search() if run.search().path.is_dir() else run
    if run.baseline().search().last.exists():
        search = run.baseline().search()  # the same training carried through the whole schedule
    if not search.last.exists():
        raise RunDirError(f"{root} holds no search (no {search.last.name}): pass the --save directory of a run or search")
    ckpt = load_checkpoint(search.last, ("search",))
    det = ckpt["detector"]
    budgets = list(det.get("budgets", []))  # targets by key (macs30); the others are ratios
    scores = (ckpt["scores"] if "scores" in ckpt else ckpt["gammas"]).float()
    data = RunData(
        root=run.path, search_dir=search.path, scores=scores,
        positions=list(ckpt.get("positions", range(len(scores)))), interval=float(det.get("interval", 1.0)),
        layer_sizes=list(det["layer_sizes"]), kinds=list(det.get("kinds", [])), kind_ratios=dict(det.get("kind_ratios", {})), rule=make_rule(det.get("rule", "star")),
        importance=det.get("importance", "bn-scale"), ties=[list(t) for t in det.get("ties", [])],
        layer_names=list(ckpt.get("layers") or [f"bn{i}" for i in range(len(det["layer_sizes"]))]),
        ratios=[float(r) for r in det["ratios"]], min_channels=int(det["min_channels"]),
        threshold=float(det["threshold"]), window=int(det["window"]),
        emerged={(r if r in budgets else float(r)): e for r, e in det["emerged"].items()},
        search_metrics=[m for m in _jsonl(search.metrics) if m.get("stage") == "search"], budgets=budgets,
        tickets={k: m for k, m in det.get("tickets", {}).items() if k in budgets},
        schedule_epochs=search.summary().get("schedule_epochs") if search.finished else None,
    )
    for r in data.targets:
        data.retrain_metrics[r] = _jsonl(run.retrain(r).metrics)
        if run.pruned(r).finished:
            data.pruned[r] = run.pruned(r).summary()
    if run.finished and run.path != search.path:
        data.summary = run.summary()
    return data


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(ax, x: str, y: str, legend_size: int = 7) -> None:
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=legend_size)


def heatmap(data: RunData, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(data.ratios), figsize=(4.2 * len(data.ratios), 3.8), squeeze=False)
    for ax, r in zip(axes[0], data.ratios):
        d = distance_matrix(data.masks(r)).numpy()
        lo, hi = data.positions[1] - data.interval / 2, data.positions[-1] + data.interval / 2
        im = ax.imshow(d, cmap="viridis", origin="upper", extent=(lo, hi, hi, lo))
        if r in data.emerged:
            e = data.emerged[r]
            ax.axvline(e, color="red", lw=1)
            ax.axhline(e, color="red", lw=1)
            ax.set_title(f"p = {r:g}: EB ticket at epoch {e}")
        else:
            ax.set_title(f"p = {r:g}: no ticket")
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        if data.interval >= 1:
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.yaxis.get_major_locator().set_params(integer=True)
        fig.colorbar(im, ax=ax, fraction=0.046, label="mask distance")
    _save(plt, fig, path)


def distances(data: RunData, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = data.positions[1:]
    for r in data.ratios:
        masks = data.masks(r)
        steps = [float("nan")] + [mask_distance(a, b) for a, b in zip(masks[1:], masks[:-1])]
        line, = ax.plot(epochs, steps, marker="o", ms=3, label=f"p={r:g}: to the previous draw")
        window = [max(d) if d else float("nan") for d in data.window_distances(r)]
        ax.plot(epochs, window, ls="--", color=line.get_color(),
                label=f"p={r:g}: largest the {data.rule.name} rule bounds in the window")
        if r in data.emerged:
            ax.axvline(data.emerged[r], color=line.get_color(), lw=0.8, ls=":")
    for key in data.budgets:  # its ratio is solved at every draw: the distances the search recorded
        drawn = [m for m in data.search_metrics if "distances" in m]
        window = [max(d) if (d := m["distances"].get(key)) else float("nan") for m in drawn]
        line, = ax.plot([m["epoch"] for m in drawn], window, ls="--",
                        label=f"{key}: largest the {data.rule.name} rule bounds in the window")
        if key in data.emerged:
            ax.axvline(data.emerged[key], color=line.get_color(), lw=0.8, ls=":")
    ax.axhline(data.bound, color="black", lw=1, label=f"threshold {data.threshold:g}" + (
        f" per epoch: {data.bound:.3g} between draws" if data.interval != 1 else ""))
    _label(ax, "epoch", "normalized Hamming distance")
    _save(plt, fig, path)


def curves(data: RunData, path: Path) -> None:
    plt = _plt()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("search", data.search_metrics)] + [(f"retrain p={target_label(r)}", m)
                                                  for r, m in data.retrain_metrics.items() if m]
    for name, metrics in series:
        metrics = [m for m in metrics if "test_acc" in m]  # draws inside an epoch are not evaluated
        x = [m["epoch"] for m in metrics]
        line, = acc.plot(x, [m["test_acc"] for m in metrics], label=f"{name} test")
        acc.plot(x, [m["train_acc"] for m in metrics], ls="--", color=line.get_color(), label=f"{name} train")
        loss.plot(x, [m["test_loss"] for m in metrics], color=line.get_color(), label=f"{name} test")
        loss.plot(x, [m["train_loss"] for m in metrics], ls="--", color=line.get_color(), label=f"{name} train")
    for ax, label in ((acc, "accuracy (%)"), (loss, "loss")):
        _label(ax, "epoch", label)
    loss.set_yscale("log")
    _save(plt, fig, path)


def gamma_histograms(data: RunData, path: Path) -> None:
    plt = _plt()
    picks = sorted({data.positions[1], *data.emerged.values(), data.epochs})
    fig, ax = plt.subplots(figsize=(7, 4))
    top = float(data.scores[1:].max())
    for e in picks:
        ax.hist(data.scores[data.draw(e) + 1].numpy(), bins=60, range=(0, top), histtype="step", lw=1.3,
                label=f"epoch {e}")
    scale = "|gamma|" if not data.kinds else "|g| (gates)" if "channel" not in data.kinds else "|gamma| (BN), |g| (gates)"
    _label(ax, scale if data.importance == "bn-scale" else f"channel importance ({data.importance})", data.unit_words, 8)
    ax.set_yscale("log")
    _save(plt, fig, path)


def kept_channels(data: RunData, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(7, 0.35 * len(data.layer_names)), 4))
    x = torch.arange(len(data.layer_names)).float()
    ax.bar(x, data.layer_sizes, color="lightgray", label="dense")
    width = 0.8 / max(1, len(data.targets))
    for k, r in enumerate(data.targets):
        if r not in data.emerged:
            continue
        mask = data.tickets[r] if isinstance(r, str) else data.masks(r)[data.draw(data.emerged[r])]
        kept = [int(m.sum()) for m in ChannelIndex(tuple(data.layer_names), tuple(data.layer_sizes)).split(mask).values()]
        ax.bar(x - 0.4 + width * (k + 0.5), kept, width=width,
               label=f"ticket p={target_label(r)} (epoch {data.emerged[r]})")
    ax.set_xticks(x.tolist(), data.layer_names, rotation=90, fontsize=6)
    ax.set_ylabel(data.unit_words)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def _markdown(data: RunData, figures: list[str]) -> str:
    lines = [f"# Early-Bird report: {data.root}", ""]
    lines += ["| ratio | EB epoch | of the schedule |", "|---|---|---|"]
    total = data.schedule_epochs or data.epochs
    for r in data.targets:
        e = data.emerged.get(r)
        lines.append(f"| {target_label(r)} | {e if e else 'none'} | {f'{e / total:.0%}' if e else '-'} |")
    s = data.summary
    if s:
        lines += ["", "| ratio | dense at ticket | masked | pruned | retrained (final / best) | params | MACs | "
                  "training speed (measured) | training MACs vs train-prune-retrain | vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in s["ratios"]:
            if row.get("eb_epoch") is None:
                continue
            p, m = row["params"], row["macs"]
            lines.append(f"| {target_label(row['ratio'])} | {row['acc_dense_at_ticket']:.2f}% | {row['acc_masked']:.2f}% | "
                         f"{row['acc_pruned']:.2f}% | {row['acc_retrained']:.2f}% / {row['acc_retrained_best']:.2f}% | "
                         f"{p['before']:,} → {p['after']:,} | {m['before'] / 1e6:.2f}M → {m['after'] / 1e6:.2f}M | "
                         f"{format_ratio(row.get('train_speedup_measured'))} | "
                         f"{row['compute_vs_train_prune_retrain']:.2f} | {row['compute_vs_dense_only']:.2f} |")
        dense_epoch = next((row["train_macs"]["dense_only"] / s["schedule_epochs"] for row in s["ratios"]
                            if row.get("eb_epoch") is not None), 0.0)
        lines += ["", "**Cost** (training MACs = 3 x forward MACs x images x epochs).", "",
                  "| | epochs | training MACs | wall time |", "|---|---|---|---|",
                  f"| search (dense) | {s['search_epochs']} of {s['schedule_epochs']} | "
                  f"{s['search_epochs'] * dense_epoch:.3g} | {format_seconds(s['search_wall_s'])} |"]
        for row in s["ratios"]:
            if row.get("eb_epoch") is not None:
                lines.append(f"| retrain p={target_label(row['ratio'])} | {row['retrain_epochs']} | "
                             f"{row['train_macs']['eb'] - row['eb_epoch'] * dense_epoch:.3g} | "
                             f"{format_seconds(row['retrain_wall_s'])} |")
        lines.append(f"| **whole run** | | {s['total_train_macs']:.3g} | {format_seconds(s['wall_s'])} |")
        base = s.get("baseline")
        if base:
            lines += ["", f"**Measured baseline** (train-prune-retrain, same schedule and seed): training time "
                      f"{format_seconds(base['train_s'])}, training MACs {base['train_macs']:.3g}; EB Train used "
                      f"{s['total_train_macs'] / base['train_macs']:.2f} of its compute and "
                      f"{s['train_s'] / base['train_s']:.2f} of its training time."]
            lines += ["", "| ratio | baseline retrained (final / best) | EB Train retrained (final / best) |",
                      "|---|---|---|"]
            for row in s["ratios"]:
                b = base["ratios"].get(str(row["ratio"]))
                if b and row.get("eb_epoch") is not None:
                    lines.append(f"| {target_label(row['ratio'])} | {b['final']:.2f}% / {b['best']:.2f}% | "
                                 f"{row['acc_retrained']:.2f}% / {row['acc_retrained_best']:.2f}% |")
    lines += [""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


FIGURES = {"heatmap.png": heatmap, "distances.png": distances, "curves.png": curves, "gammas.png": gamma_histograms,
           "channels.png": kept_channels}


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Render every figure and report.md into ``out`` (default: RUN_DIR/report); returns the page."""
    data = load_run(root)
    out = Path(out) if out else Path(root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(data, out / name)
    page = out / "report.md"
    page.write_text(_markdown(data, list(FIGURES)))
    return page
