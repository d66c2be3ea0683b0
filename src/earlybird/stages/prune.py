"""Prune: physically remove a ticket's channels and measure what that gives."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import DataConfig, ModelCheck, PruneConfig, PruneOptions, RuntimeConfig, WidthConfig
from ..cost import count_macs, count_params
from ..data import Dataset
from ..errors import CheckpointError, ConfigError
from ..budget import BudgetTicket, solve_budget
from ..importance import make_importance
from ..masks import UNIT_WORDS, ChannelIndex, channel_mask, check_ratio, describe_units, prunable_bns
from ..progress import Reporter
from ..prune import channel_ties, prunable_layers, prune_model
from ..train import evaluate, load_checkpoint, model_from_checkpoint, save_checkpoint
from ..accel import inference_speed, training_speed
from .common import check_expected, checkpoint_data, data_meta, make_loader, setup_runtime
from .rundir import PRUNED, RunDir, tag


def _keep_streams(cfg: PruneConfig, ckpt: dict, reporter: Reporter) -> bool:
    """--keep-streams where given, else the search's choice; a one-line note where they differ."""
    recorded = bool(ckpt.get("keep_streams", False))
    if cfg.keep_streams is None or (cfg.keep_streams == "on") == recorded:
        return recorded
    whose = "its search's choice" if "keep_streams" in ckpt else "the default for a checkpoint that records none"
    reporter.line(f"note: --keep-streams {cfg.keep_streams} overrides {whose} ({'on' if recorded else 'off'}) in "
                  f"{cfg.model}: residual streams {'stay at full width' if not recorded else 'may be pruned'} and the "
                  "mask is recomputed over the layers that leaves prunable")
    return not recorded


def _ticket_mask(ckpt: dict, dense, cfg: PruneConfig, keep_streams: bool, round_to: int, example
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], BudgetTicket | None]:
    """(mask, scores, budget ticket) by BN name: the ticket's own mask, or one recomputed at --percent,
    or at the ratio that meets --target-macs/--target-params, over the same prunable layers by the
    search's importance (a grouped conv's tied channels ranked as one, as the search ranks them);
    the scores rank what --round-to gives back. A --keep-streams other than the search's recomputes
    the mask over the layers it leaves prunable."""
    as_searched = keep_streams == bool(ckpt.get("keep_streams", False))
    layers = ckpt.get("layers") if as_searched else None
    index = ChannelIndex.of(dense, layers or prunable_layers(dense, example, keep_streams))
    importance = make_importance(ckpt.get("importance", "bn-scale")).bind(dense, example)
    scores = torch.cat(importance.scores(dense, index.names))
    if cfg.budget:
        found = solve_budget(dense, index.split(scores), example, *cfg.budget, channel_ties(dense, example),
                             cfg.min_channels, keep_streams, round_to, kind_ratios=ckpt.get("kind_ratios"))
        return found.masks, index.split(scores), found
    if cfg.percent is None and "mask" in ckpt and as_searched:
        mask = ckpt["mask"]
    else:
        mask = channel_mask(scores, check_ratio(cfg.percent or ckpt.get("ratio", 0.5)), index.sizes, cfg.min_channels,
                            index.flat_ties(channel_ties(dense, example)), index.kinds, ckpt.get("kind_ratios"))
    return index.split(mask), index.split(scores), None


def grouped_report(dense, pruned) -> dict:
    """How each grouped (not depthwise) conv was pruned: the same positions left every group."""
    after = dict(pruned.named_modules())
    rows = {}
    for name, m in dense.named_modules():
        if isinstance(m, torch.nn.Conv2d) and 1 < m.groups < m.out_channels and name in after:
            p = after[name]
            if (p.in_channels, p.out_channels) != (m.in_channels, m.out_channels):
                rows[name] = {"groups": m.groups, "in_per_group": [m.in_channels // m.groups, p.in_channels // p.groups],
                              "out_per_group": [m.out_channels // m.groups, p.out_channels // p.groups]}
    return rows


def prune(cfg: PruneConfig, options: PruneOptions, data: DataConfig, rt: RuntimeConfig, reporter: Reporter,
          dataset: Dataset | None = None, check: ModelCheck | None = None, save: Path | None = None,
          widths: WidthConfig | None = None) -> dict:
    """Physically prune an EB ticket (or a search checkpoint) and report what changed."""
    round_to = (widths or WidthConfig()).round_to
    if not cfg.model:
        raise ConfigError("--model is required: pass an EB ticket such as runs/x/EB-30-12.pth")
    platform = setup_runtime(rt)
    device = platform.device
    ckpt = load_checkpoint(cfg.model, ("ticket", "search", "imported"))
    if ckpt.get("plan"):
        raise CheckpointError(f"{cfg.model} is already pruned: retrain it, or prune its dense ticket")
    ratio = check_ratio(cfg.percent if cfg.percent is not None else ckpt.get("ratio", 0.5))
    name = f"{cfg.budget[0]}{tag(cfg.budget[1])}" if cfg.budget else tag(ratio)
    run = RunDir(Path(save or rt.save or Path(cfg.model).parent / f"pruned-{name}"))
    run.prepare(rt.force)
    dense, spec, _ = model_from_checkpoint(ckpt, cfg.model)
    check_expected(check, spec, cfg.model)
    dense = dense.to(device).eval()
    dataset = dataset or checkpoint_data(ckpt, data, cfg.model, platform, reporter)
    test = make_loader(dataset, data, platform, False, train=False)
    example = next(iter(test))[0][:8]
    keep_streams = _keep_streams(cfg, ckpt, reporter)
    requested, scores, budget = _ticket_mask(ckpt, dense, cfg, keep_streams, round_to, example)
    ratio = budget.ratio if budget else ratio
    pruned, plan = prune_model(dense, requested, example, keep_streams, round_to, scores)
    report = _report(cfg, ckpt, ratio, keep_streams, round_to, requested, dense, pruned, plan, example, test, budget)
    if options.measure_speed and platform.is_main:
        # timed by rank 0 alone (the others wait at write_summary's barrier), at one worker's batch:
        # the global batch on one GPU is not what training runs, and may not fit
        shape, per_worker = report["input_shape"], platform.per_worker(data.batch_size)
        report["throughput"] = inference_speed(dense, pruned, shape, options.latency_batches, device)
        report["training_throughput"] = training_speed(dense, pruned, shape, spec.num_classes, per_worker, device, rt)
    save_checkpoint(run / PRUNED, "pruned", spec, pruned, plan, ratio=ratio, epoch=ckpt.get("epoch"),
                    start=ckpt.get("start"),
                    **{**data_meta(dataset.info), "input_shape": report["input_shape"]},
                    test_acc=report["test_acc"]["pruned"])
    run.write_summary(report)
    _say(report, cfg, plan, run / PRUNED, reporter)
    return report


def _report(cfg: PruneConfig, ckpt: dict, ratio: float, keep_streams: bool, round_to: int, requested: dict,
            dense, pruned, plan, example, test, budget: BudgetTicket | None) -> dict:
    """What pruning changed (channels, layers, parameters, MACs) and what it costs in accuracy: the
    dense, the masked and the pruned network on the test split."""
    effective, masked = plan.masks(dense), plan.masked(dense)
    with torch.no_grad():
        want = masked.eval()(example)
        out_diff = (pruned.eval()(example) - want).abs().max().item()
    shape = ckpt.get("input_shape", list(example.shape[1:]))
    before = ChannelIndex.of(dense).layer_sizes()
    after = {**before, **{n: len(k) for n, k in plan.units.items()},  # the pruned network has no gates
             **(ChannelIndex.of(pruned).layer_sizes() if prunable_bns(pruned) else {})}
    prunable = ChannelIndex.of(dense, list(requested))
    kept = prunable.kind_sizes(after)
    results = {name: evaluate(model, test) for name, model in (("dense", dense), ("masked", masked), ("pruned", pruned))}
    report = {
        "stage": "prune", "source": str(cfg.model), "ratio": ratio, "epoch": ckpt.get("epoch"),
        "keep_streams": keep_streams, "round_to": round_to, "input_shape": shape,
        "channels": {"before": sum(before.values()), "after": sum(after.values()),
                     "prunable": sum(int(m.numel()) for m in requested.values()),
                     "requested": sum(int((~m).sum()) for m in requested.values()),
                     "removed": sum(before.values()) - sum(after.values()),
                     "dead": sum(int((m & ~effective[n]).sum()) for n, m in requested.items() if n in effective)},
        "layers": {n: [before[n], after[n]] for n in before},
        "units": {k: [n, kept[k]] for k, n in prunable.kind_sizes().items()},  # per kind: prunable, kept
        "params": {"before": count_params(dense), "after": count_params(pruned)},
        "macs": {"before": count_macs(dense, shape), "after": count_macs(pruned, shape)},
        "test_acc": {k: r.top1 for k, r in results.items()},
        "test_top5": {k: r.top5 for k, r in results.items()},
        # the engine's own check, relative to the output's size: under 1e-3
        "max_output_diff_pruned_vs_masked": out_diff, "max_output_diff_relative": out_diff / (1 + want.abs().max().item()),
        "folds": plan.folds, "selects": plan.selects, "shift_zeroed": {n: len(c) for n, c in plan.zeroed.items()},
        "grouped": grouped_report(dense, pruned), "throughput": {}, "training_throughput": None,
        "device": str(example.device),
    }
    return {**report, **_budget_report(cfg, ckpt, budget, report)}


def _budget_report(cfg: PruneConfig, ckpt: dict, budget: BudgetTicket | None, report: dict) -> dict:
    """The budget asked (solved here, or by the search for a budget ticket) and what the pruned network has."""
    asked = (budget.metric, budget.asked) if budget else (
        (ckpt["budget"]["metric"], ckpt["budget"]["asked"]) if "budget" in ckpt and cfg.percent is None else None)
    if not asked:
        return {}
    sizes = report[asked[0]]  # the MACs or parameters the report counted
    return {"budget": {"metric": asked[0], "asked": asked[1], "reached": round(sizes["after"] / sizes["before"], 4),
                       "ratio": round(report["ratio"], 4)}}


def _say(report: dict, cfg: PruneConfig, plan, out: Path, reporter: Reporter) -> None:
    p, m, c, a = report["params"], report["macs"], report["channels"], report["test_acc"]
    device = report["device"]
    units = describe_units({k: b for k, (b, _) in report["units"].items()}, "prunable")
    reporter.line(f"pruned {cfg.model} at p={report['ratio']:g} of {units}: asked "
                  f"{c['requested']}, removed {c['removed']} (coupled channels stay while any member needs them"
                  + (f"; {c['dead']} unasked went as they fed only masked BNs" if c["dead"] else "")
                  + (f"; --round-to {report['round_to']} keeps multiples of {report['round_to']}" if report["round_to"] > 1 else "")
                  + "), " + (f"channels {c['before']} -> {c['after']}" if list(report["units"]) == ["channel"] else
                             ", ".join(f"{UNIT_WORDS[k]} {b} -> {a}" for k, (b, a) in report["units"].items())))
    if "budget" in report:
        b = report["budget"]
        reporter.line(f"  budget: {b['asked']:g} of the dense network's {b['metric']} asked, {b['reached']:.3f} reached "
                      f"(ratio {b['ratio']:.3f} solved on the ticket's scores)")
    if report["grouped"]:
        rows = report["grouped"].values()
        reporter.line(f"  {len(rows)} grouped convolutions lost the same channel positions from each of their groups "
                      f"(per group: {sum(r['in_per_group'][0] for r in rows)} -> {sum(r['in_per_group'][1] for r in rows)} "
                      f"inputs, {sum(r['out_per_group'][0] for r in rows)} -> {sum(r['out_per_group'][1] for r in rows)} "
                      "outputs over those layers)")
    if plan.zeroed:
        reporter.line(f"  {sum(map(len, plan.zeroed.values()))} removed channels of {len(plan.zeroed)} BNs have their "
                      "shift zeroed as well (a gate or a padded pool lies between them and the next conv, so their "
                      "constant cannot be folded): 'masked' below is the network with those shifts zeroed")
    reporter.line(f"  params {p['before']:,} -> {p['after']:,} ({p['before'] / p['after']:.2f}x less), "
                  f"MACs {m['before'] / 1e6:.2f}M -> {m['after'] / 1e6:.2f}M ({m['before'] / m['after']:.2f}x less)")
    for b, row in report["throughput"].items():
        reporter.line(f"  inference on {device}, batch {b}: dense {row['dense']:.0f} img/s, pruned {row['pruned']:.0f} "
                      f"img/s ({row['speedup']:.2f}x)")
    train = report["training_throughput"]
    if train:
        d, q = train["dense"], train["pruned"]
        reporter.line(f"  training on {device}, batch {train['batch']}: dense {d['images_per_s']:.0f} img/s "
                      f"({d['setting']}), pruned {q['images_per_s']:.0f} img/s ({q['setting']}): {train['speedup']:.2f}x for "
                      f"{m['before'] / m['after']:.2f}x fewer MACs")
    reporter.line(f"  test accuracy: dense {a['dense']:.2f}%  masked {a['masked']:.2f}%  pruned {a['pruned']:.2f}%  "
                  f"(max |pruned - masked| output {report['max_output_diff_pruned_vs_masked']:.1e}, "
                  f"{report['max_output_diff_relative']:.1e} of the output's size) -> {out}")
