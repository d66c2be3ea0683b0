"""The whole pipeline (search -> prune -> retrain per ratio), its measured baseline and its table."""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

from ..config import (DataConfig, DetectConfig, LowPrecisionConfig, ModelConfig, OptimConfig, PipelineOptions,
                      PruneConfig, PruneOptions, RetrainConfig, RuntimeConfig, StartConfig, WidthConfig)
from ..budget import parse_budget_key, prune_flags
from ..cost import training_macs
from ..errors import RunDirError
from ..models import ModelSpec, create_model
from ..progress import Reporter, format_ratio, format_seconds
from ..train import distributed
from .common import DEFAULT_DATASET, default_save, load_data, low_precision, model_spec, setup_runtime, survey_data
from .rundir import LAST, METRICS, PRUNED, SUMMARY, RunDir, label
from .prune import prune
from .retrain import retrain
from .search import search


def _stage_runtime(rt: RuntimeConfig, stage: RunDir) -> RuntimeConfig | None:
    """Runtime of one stage of `earlybird run`; None when --resume finds the stage already done."""
    if rt.resume is None:
        return replace(rt, resume=None)
    if stage.finished:
        return None
    return replace(rt, resume="" if stage.last.exists() else None, force=False)


def run_pipeline(data: DataConfig, model_cfg: ModelConfig, optim: OptimConfig, detect: DetectConfig,
                 options: PruneOptions, rt: RuntimeConfig, reporter: Reporter, lowp: LowPrecisionConfig | None = None,
                 pipeline: PipelineOptions | None = None, widths: WidthConfig | None = None,
                 start: StartConfig | None = None) -> dict:
    """Search until the tickets, prune each, retrain each, and account for the compute spent
    (``start``: the weights the search starts from)."""
    lowp, pipeline = lowp or LowPrecisionConfig(), pipeline or PipelineOptions()
    lowp.check_schedule(optim)
    data = replace(data, dataset=data.dataset or DEFAULT_DATASET)
    run = RunDir(Path(rt.save or default_save(data, model_cfg)))
    t0 = time.perf_counter()
    platform = setup_runtime(rt)  # first: under torchrun, which rank this is (rank 0 alone locks and writes)
    run.lock()
    rt = _continue_or_start(run, rt, reporter)
    # fail on a bad model before loading data
    surveyed = survey_data(data, platform)
    create_model(model_spec(model_cfg, surveyed.info))
    dataset = load_data(data, platform, reporter, surveyed)
    stage_rt = _stage_runtime(rt, run.search())
    found = run.search().summary() if stage_rt is None else search(
        data, model_cfg, optim, detect, stage_rt, reporter, dataset, run.search().path, lowp, widths, start)
    rows = []
    for r in _targets(found):
        ticket = found["tickets"].get(str(r))
        if ticket is None:
            rows.append({"ratio": r, "eb_epoch": None, "closest": (found.get("closest") or {}).get(str(r)),
                         "threshold": found["threshold"], "last": str(run.search().last)})
            continue
        reporter.line(f"--- p={label(r)}: prune the ticket of epoch {ticket['epoch']}, then retrain")
        retrain_cfg = RetrainConfig(reinit=pipeline.reinit, rewind=pipeline.rewind)
        pr, rr = _prune_and_retrain(run, run.search() / ticket["path"], None, r, detect, options, widths, data, optim,
                                    rt, reporter, dataset, lowp, retrain_cfg)
        rows.append(_ratio_row(r, ticket, pr, rr, found, optim.epochs))
    summary = _summary(data, found, rows, optim.epochs, lowp, time.perf_counter() - t0)
    if pipeline.baseline:
        summary["baseline"] = _baseline(run, data, model_cfg, optim, detect, options, widths, rt, reporter, dataset,
                                        lowp, found)
    run.write_summary(summary)
    table = summary_table(summary)
    if distributed.is_main():
        (run / "summary.txt").write_text(table + "\n")
    reporter.line(table)
    return summary


def _targets(found: dict) -> list[float | str]:
    """The search's ratios, then its budgets (keys such as "macs50")."""
    return list(found["ratios"]) + list(found.get("budgets", []))


def _prune_config(source: Path, target: float | str | None, min_channels: int) -> PruneConfig:
    """Prune ``source`` at a ratio, at a budget (by its key), or (None) at the ticket's own mask."""
    if isinstance(target, str):
        metric, fraction = parse_budget_key(target)
        return PruneConfig(str(source), None, min_channels, **{f"target_{metric}": fraction})
    return PruneConfig(str(source), target, min_channels)


def _continue_or_start(run: RunDir, rt: RuntimeConfig, reporter: Reporter) -> RuntimeConfig:
    """A finished run needs --force; an unfinished one is continued as with --resume."""
    if rt.resume is None and not rt.force:
        if run.finished:
            raise RunDirError(f"{run.path} holds a finished run: choose another --save or pass --force to overwrite it")
        if run.search().path.exists():
            reporter.line(f"{run.path} holds an unfinished run: continuing it (pass --force to start over)")
            rt = replace(rt, resume="")
    if rt.force and run.finished and distributed.is_main():
        (run / SUMMARY).unlink()
    distributed.barrier()  # every worker decided on what it found before rank 0 changes anything
    return rt


def _prune_and_retrain(run: RunDir, source: Path, percent: float | None, ratio: float, detect: DetectConfig,
                       options: PruneOptions, widths: WidthConfig | None, data, optim, rt, reporter, dataset, lowp,
                       retrain_cfg: RetrainConfig) -> tuple[dict, dict]:
    """One ratio's prune stage (of ``source``, at ``percent`` or the ticket's own ratio) and retrain
    stage under ``run``, each read from its summary where a resumed run finished it."""
    prune_dir, retrain_dir = run.pruned(ratio), run.retrain(ratio)
    if _stage_runtime(rt, prune_dir) is None:
        pr = prune_dir.summary()
    else:
        pr = prune(_prune_config(source, percent, detect.min_channels), options, data,
                   replace(rt, resume=None, force=True), reporter, dataset, save=prune_dir.path, widths=widths)
    stage_rt = _stage_runtime(rt, retrain_dir)
    rr = retrain_dir.summary() if stage_rt is None else retrain(
        replace(retrain_cfg, model=str(prune_dir / PRUNED)), data, optim, stage_rt, reporter, dataset,
        retrain_dir.path, lowp)
    return pr, rr


def _ratio_row(r: float, ticket: dict, pr: dict, rr: dict, found: dict, epochs: int) -> dict:
    """One ratio's line of the run's summary: accuracies, size and the compute spent against
    train-prune-retrain and against dense training."""
    dense_epoch = training_macs(found["macs"], found["train_images"], 1)
    eb_compute = ticket["epoch"] * dense_epoch + rr["epochs_trained"] * training_macs(pr["macs"]["after"],
                                                                                      found["train_images"], 1)
    standard = epochs * dense_epoch + epochs * training_macs(pr["macs"]["after"], found["train_images"], 1)
    return {
        "ratio": r, "eb_epoch": ticket["epoch"], "eb_fraction": round(ticket["epoch"] / epochs, 4),
        "acc_dense_at_ticket": pr["test_acc"]["dense"], "acc_masked": pr["test_acc"]["masked"],
        "acc_pruned": pr["test_acc"]["pruned"], "acc_retrained": rr["final_test_acc"],
        "acc_retrained_best": rr["best_test_acc"], "acc_retrained_swa": rr.get("swa_test_acc"),
        "params": pr["params"], "macs": pr["macs"],
        "train_speedup_measured": (pr.get("training_throughput") or {}).get("speedup"),
        "retrain_epochs": rr["epochs_trained"], "reinit": rr["reinit"], "rewind": rr.get("rewind", "ticket"),
        "train_macs": {"eb": eb_compute, "train_prune_retrain": standard, "dense_only": epochs * dense_epoch},
        "compute_vs_train_prune_retrain": round(eb_compute / standard, 4),
        "compute_vs_dense_only": round(eb_compute / (epochs * dense_epoch), 4),
        "retrain_wall_s": rr["wall_s"], "retrain_train_s": rr["train_s"],
    }


def _summary(data: DataConfig, found: dict, rows: list[dict], epochs: int, lowp: LowPrecisionConfig,
             wall: float) -> dict:
    images = found["train_images"]
    drawn = [row for row in rows if row["eb_epoch"]]
    spent = found["epochs_trained"] * training_macs(found["macs"], images, 1) + sum(
        row["retrain_epochs"] * training_macs(row["macs"]["after"], images, 1) for row in drawn)
    return {
        "dataset": data.dataset, "spec": found["spec"], "schedule_epochs": epochs,
        "search_epochs": found["epochs_trained"], "search_final_test_acc": found["final_test_acc"],
        "dense_params": found["params"], "dense_macs": found["macs"], "ratios": rows,
        "total_train_macs": spent, "search_wall_s": found["wall_s"], "wall_s": round(wall, 1),
        "train_s": round(found["train_s"] + sum(row["retrain_train_s"] for row in drawn), 1),
        "compute_note": "training MACs = 3 x forward MACs x images x epochs; evaluation not counted"
                        + ("; the starting weights' own training not counted" if found.get("start") else ""),
        "start": found.get("start"),
        "number_formats": found.get("number_formats"),
        "arithmetic_cost_vs_fp32": round(low_precision(lowp).relative_arithmetic_cost(), 4),
    }


def _baseline(run: RunDir, data, model_cfg, optim, detect, options, widths, rt, reporter, dataset, lowp,
              found) -> dict:
    """Train-prune-retrain, measured: dense training over the whole schedule, each ratio pruned at
    the end and fine-tuned over the whole schedule again (network slimming), same seed. The dense
    training continues the EB search's checkpoint: with the same seed its first epochs are the same
    computation, so their time is the search's."""
    base = run.baseline()
    search_dir = base.search()
    if search_dir.finished:
        dense = search_dir.summary()
    else:
        if not search_dir.last.exists() and distributed.is_main():
            search_dir.path.mkdir(parents=True, exist_ok=True)
            for name in (LAST, METRICS):
                shutil.copy2(run.search() / name, search_dir / name)
        distributed.barrier()
        reporter.line(f"--- baseline: dense training continues to epoch {optim.epochs}, then prune and fine-tune")
        dense = search(data, model_cfg, optim, replace(detect, full=True), replace(rt, resume="", force=False),
                       reporter, dataset, search_dir.path, lowp, widths)
    dense_epoch = training_macs(dense["macs"], dense["train_images"], 1)
    out = {"dense_final_test_acc": dense["final_test_acc"], "ratios": {},
           "train_s": found["train_s"] + dense["train_s"], "train_macs": optim.epochs * dense_epoch}
    for r in _targets(found):
        pr, rr = _prune_and_retrain(base, search_dir.last, r, r, detect, options, widths, data, optim,
                                    replace(rt, resume=""), reporter, dataset, lowp, RetrainConfig(start_epoch=0))
        out["ratios"][str(r)] = {"final": rr["final_test_acc"], "best": rr["best_test_acc"],
                                 "params": pr["params"]["after"], "macs": pr["macs"]["after"]}
        out["train_s"] += rr["train_s"]
        out["train_macs"] += rr["epochs_trained"] * training_macs(pr["macs"]["after"], dense["train_images"], 1)
    out["train_s"] = round(out["train_s"], 1)
    return out


def summary_table(summary: dict) -> str:
    n = summary["schedule_epochs"]
    head = (f"Early-Bird run: {ModelSpec.from_dict(summary['spec']).describe()} on {summary['dataset']}, "
            f"schedule {n} epochs, search stopped after {summary['search_epochs']} "
            f"(dense {summary['search_final_test_acc']:.2f}%), wall {format_seconds(summary['wall_s'])}")
    cols = ["p", "EB epoch", "masked", "pruned", "retrained", "best", "params", "MACs", "train speed", "compute vs TPR",
            "vs dense"]
    lines = [head, "  ".join(f"{c:>10}" for c in cols)]
    for row in summary["ratios"]:
        if row["eb_epoch"] is None:
            near = (f": its masks came within {row['closest']['distance']:.3f} at best (--eb-threshold "
                    f"{row['threshold']:g})" if row.get("closest") else "")
            lines.append(f"{label(row['ratio']):>10}  no ticket within the search{near}; a longer schedule or a larger "
                         f"threshold may draw one, or prune now: earlybird prune --model {row.get('last')} "
                         f"{prune_flags(row['ratio'])}")
            continue
        p, m = row["params"], row["macs"]
        cells = [label(row["ratio"]), f"{row['eb_epoch']}/{n}", f"{row['acc_masked']:.2f}%", f"{row['acc_pruned']:.2f}%",
                 f"{row['acc_retrained']:.2f}%", f"{row['acc_retrained_best']:.2f}%", f"{p['before'] / p['after']:.2f}x less",
                 f"{m['before'] / m['after']:.2f}x less", format_ratio(row.get("train_speedup_measured")),
                 f"{row['compute_vs_train_prune_retrain']:.2f}",
                 f"{row['compute_vs_dense_only']:.2f}"]
        lines.append("  ".join(f"{c:>10}" for c in cells))
    lines.append("masked, pruned = the ticket's network before retraining: the search drove the pruned channels' "
                 "gamma small but not to zero, so removing them can cost much accuracy (even to chance) until the "
                 "retrain recovers it")
    lines.append("train speed = measured training images/s of the pruned network over the dense one's (at prune time); "
                 "compute = training MACs of EB Train (EB epochs dense + retrain epochs pruned) divided by "
                 "train-prune-retrain (TPR: full schedule dense + full schedule pruned) and by dense-only training")
    if summary.get("start"):
        rewound = any(row.get("rewind") == "pretrained" for row in summary["ratios"])
        lines.append(f"started from {summary['start']} (its training not counted): vs dense = Early-Bird fine-tuning "
                     f"over dense fine-tuning for the same schedule; the retrain "
                     + ("started again from these weights, pruned to the ticket (--rewind pretrained)" if rewound
                        else "continued from the ticket"))
    formats = summary.get("number_formats") or {}
    if any(v != "fp32" for k, v in formats.items() if k != "rounding"):
        lines.append("number formats: " + ", ".join(f"{k} {v}" for k, v in formats.items()) + "; arithmetic cost "
                     f"(bits x operations) {summary['arithmetic_cost_vs_fp32']:.2f} of fp32")
    base = summary.get("baseline")
    if base:
        lines.append(f"measured train-prune-retrain (same schedule and seed): training {format_seconds(base['train_s'])} "
                     f"vs EB Train {format_seconds(summary['train_s'])} ({summary['train_s'] / base['train_s']:.2f}), "
                     f"training MACs {summary['total_train_macs'] / base['train_macs']:.2f} of it; retrained accuracy "
                     + ", ".join(f"p={r} {b['final']:.2f}% (EB Train {row['acc_retrained']:.2f}%)"
                                 for r, b in base["ratios"].items() for row in summary["ratios"]
                                 if str(row["ratio"]) == r and row.get("eb_epoch") is not None))
    swa = [r for r in summary["ratios"] if r.get("acc_retrained_swa") is not None]
    if swa:
        lines.append("SWA (averaged weights) accuracy: " + ", ".join(
            f"p={label(r['ratio'])} {r['acc_retrained_swa']:.2f}%" for r in swa))
    return "\n".join(lines)
