"""Search: train the dense network with BN-scale sparsity until the Early-Bird tickets emerge."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..accel import format_name, precision_name
from ..config import (DataConfig, DetectConfig, LowPrecisionConfig, ModelConfig, OptimConfig, RuntimeConfig,
                      StartConfig, WidthConfig)
from ..cost import count_macs, count_params
from ..pretrained import load_pretrained
from ..data import Dataset
from ..detector import EarlyBird
from ..errors import CheckpointError, ConfigError
from ..budget import BudgetTarget, prune_flags
from ..importance import make_importance
from ..gates import HEAD, attach_gates, find_gates
from ..masks import CHANNEL, ChannelIndex, bn_gammas, describe_units, prunable_bns
from ..models import ModelSpec, create_model
from ..progress import Reporter
from ..prune import channel_ties, prunable_layers
from ..train import distributed, load_checkpoint
from ..train.callbacks import Saver
from ..train.trainer import Callback, Trainer
from .common import (DEFAULT_DATASET, data_meta, default_save, load_data, make_loaders, make_trainer, model_spec,
                     probe_inputs, setup_runtime, survey_data, with_callbacks)
from .rundir import RunDir, label


class EarlyBirdCallback(Callback):
    """Steps the detector at every draw (each epoch's end, or every --eb-interval steps), saves each
    ticket as it emerges, and stops the search once every ratio has one (unless ``full``), inside an
    epoch if it is drawn there. Its checkpoint entries: the detector, the score snapshots of every
    draw with their positions (the report's heat-map) and the tickets saved."""

    def __init__(self, detector: EarlyBird, run: RunDir, saver: Saver, full: bool, every: int):
        self.detector, self.run, self.saver, self.full, self.every = detector, run, saver, full, every
        self.scores, self.positions, self.tickets = [detector.scores()], [0], {}

    def on_step(self, trainer: Trainer, record: dict) -> str:
        return self._draw(trainer, record)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> str:
        g = bn_gammas(self.detector.index.bns(trainer.model))
        record["gamma"] = {"mean": round(g.mean().item(), 5), "below_0.01": round((g < 0.01).float().mean().item(), 4)}
        if trainer.batch or trainer.global_step % self.every:  # stopped inside the epoch, or no draw due
            return ""
        return self._draw(trainer, record)

    def _draw(self, trainer: Trainer, record: dict) -> str:
        det, at = self.detector, trainer.position
        self.scores.append(det.scores())
        self.positions.append(at)
        distributed.check_agree(self.scores[-1], "the channel scores")
        emerged = det.step(at, self.scores[-1])
        record["distances"] = {str(r): [round(d, 4) for d in det.distances[r]] for r in det.targets}
        test_acc = record.get("test_acc")  # none inside an epoch: the network is evaluated at epochs' ends
        for r in emerged:
            path = self.run.ticket(r, det.emerged[r])
            solved = det.budgets[r].last if r in det.budgets else None
            budget = {"budget": {"metric": solved.metric, "asked": solved.asked, "reached": solved.reached}} \
                if solved else {}
            self.saver.save(path, "ticket", trainer.model, ratio=solved.ratio if solved else r, epoch=det.emerged[r],
                            step=trainer.global_step, mask=det.tickets[r], test_acc=test_acc, **budget)
            self.tickets[str(r)] = {"epoch": det.emerged[r], "step": trainer.global_step, "path": path.name,
                                    "test_acc": test_acc}
        trainer.stop = det.done and not self.full
        dist = "  ".join(f"d{label(r)}=" + (f"{max(det.distances[r]):.3f}" if det.distances[r] else "-")
                         + ("*" if r in det.emerged else "") for r in det.targets)
        return f"  | max dist {dist}" + "".join(f"  -> EB ticket p={label(r)} at epoch {det.emerged[r]} "
                                                f"(step {trainer.global_step})" for r in emerged)

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "scores": torch.stack(self.scores),
                "positions": list(self.positions), "tickets": self.tickets}

    def load_state_dict(self, ckpt: dict) -> None:
        self.detector.load_state_dict(ckpt["detector"])
        self.scores = list(ckpt["scores"] if "scores" in ckpt else ckpt["gammas"])
        self.positions = list(ckpt.get("positions", range(len(self.scores))))
        self.tickets = ckpt["tickets"]


def search(data: DataConfig, model_cfg: ModelConfig, optim: OptimConfig, detect: DetectConfig, rt: RuntimeConfig,
           reporter: Reporter, dataset: Dataset | None = None, save: Path | None = None,
           lowp: LowPrecisionConfig | None = None, widths: WidthConfig | None = None,
           start: StartConfig | None = None) -> dict:
    """Train the dense network with BN-scale sparsity until every ratio's Early-Bird ticket emerges
    (``widths``: the pruned widths budget targets are solved for, as --round-to prunes them)."""
    data = replace(data, dataset=data.dataset or DEFAULT_DATASET)
    run = RunDir(Path(save or rt.save or default_save(data, model_cfg)))
    platform = setup_runtime(rt)
    surveyed = None if dataset else survey_data(data, platform)
    spec = model_spec(model_cfg, dataset.info if dataset else surveyed.info)
    model, layers, ties, importance, budgets = _dense(spec, detect, (widths or WidthConfig()).round_to)  # before the data
    unsupported = find_gates(model).unsupported
    if unsupported:
        reporter.line(f"note: {len(unsupported)} modules keep all their units, earlybird cannot prune them exactly: "
                      + "; ".join(f"{n} ({why})" for n, why in list(unsupported.items())[:3])
                      + (f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""))
    source = start.source(spec.arch) if start else None
    if source:
        reporter.line(f"starting weights {source}: {load_pretrained(model, source).describe()}")
    resume_path = run.prepare(rt.force, rt.resume, reporter)
    dataset = dataset or load_data(data, platform, reporter, surveyed)
    ckpt = _resumed(resume_path, spec)
    trainer = make_trainer(model, spec, data, optim, rt, lowp, platform, reporter, "search", ckpt)
    loaders = make_loaders(dataset, data, platform, trainer.speed.channels_last)
    steps = len(loaders[0])
    every = detect.check_steps(steps)
    detector = EarlyBird(trainer.model, detect.ratios, detect.eb_window, detect.eb_threshold, detect.min_channels,
                         layers, ties, importance, detect.eb_rule, budgets, interval=every / steps,
                         kind_ratios=detect.kind_ratios())
    info = dataset.info
    saver = Saver(spec, None, {**data_meta(info), "layers": layers, "keep_streams": detect.keep_streams,
                               "importance": importance.name, "start": str(source) if source else None,
                               "gates": bool(detector.index.kinds), "kind_ratios": detector.kind_ratios})
    eb = EarlyBirdCallback(detector, run, saver, detect.full, every)
    trainer.check_every = every
    with_callbacks(trainer, run, saver, "search", loaders, rt, eb)
    if ckpt:
        trainer.load_state_dict(ckpt, resume_path)
    macs = count_macs(trainer.model, tuple(saver.meta["input_shape"]))
    total = ChannelIndex.of(trainer.model).kind_sizes().get(CHANNEL, 0)
    units = describe_units(detector.index.kind_sizes(), "prunable") + (
        " (heads ranked within each layer)" if HEAD in detector.index.kinds else "")
    layers_said = f"{len(layers)} layers" + (f"; {total} BN channels in all" if total else "")
    reporter.line(f"search: {spec.describe()}, {count_params(trainer.model):,} params, {macs / 1e6:.1f} M MACs/image, "
                  f"{loaders[0].num_samples:,} training images on {platform.device}; ratios are of the {units} "
                  f"({layers_said})"
                  + ("" if every == steps else f"; masks drawn every {every} of the epoch's {steps} steps, within "
                     f"{detector.bound:.4g} of each other (--eb-threshold {detector.threshold:g} per epoch)"))
    if detector.bound * detector.num_channels < 2:  # one channel in, one out moves the mask by 2 / channels
        reporter.line(f"note: at this interval the bound lets no channel change places ({detector.bound:.4g} x "
                      f"{detector.num_channels} channels < 2): tickets need identical masks; a longer --eb-interval "
                      f"or a larger --eb-threshold relaxes it")
    t0 = time.perf_counter()
    trainer.fit(*loaders)
    summary = _summary(trainer, eb, spec, info.name, detect, total, macs, loaders[0].num_samples, time.perf_counter() - t0)
    summary["start"] = saver.meta["start"]
    run.write_summary(summary, trainer.saved_at)
    for r in detector.targets:
        t = eb.tickets.get(str(r))
        reporter.line(f"  p={label(r)}: " + (f"EB ticket at epoch {t['epoch']}/{optim.epochs} (step "
                                             f"{t.get('step', '?')}) -> {run / t['path']}"
                                         if t else no_ticket_advice(r, detector, trainer.position, run.last)))
    return summary


def no_ticket_advice(ratio: float | str, detector: EarlyBird, epochs: float, last: Path) -> str:
    """Why ``ratio`` has no ticket (how close its masks came to settling) and what to do next."""
    closest = detector.closest.get(ratio)
    scale = detector.interval  # the threshold is per epoch; the window's masks are interval apart
    if closest:
        per = f" per epoch, {detector.bound:.4g} at this interval" if scale != 1 else ""
        near = (f"its masks came within {closest[0]:.3f} of each other at best (epoch {closest[1]}; "
                f"--eb-threshold {detector.threshold:g}{per})")
    else:
        near = f"the window of {detector.window} masks never filled" + (
            ": draw them inside epochs with --eb-interval (e.g. 0.1)" if scale >= 1 else "")
    return (f"no ticket within {epochs} epochs: {near}. Next: a longer --epochs or an earlier first --schedule "
            f"decay (masks settle as the rate falls), a larger --eb-threshold (e.g. "
            f"{max(detector.threshold, closest[0] / scale if closest else 0) + 0.05:.2f}), or prune where the search "
            f"stopped: earlybird prune --model {last} {prune_flags(ratio)}")


def _resumed(path: Path | None, spec: ModelSpec) -> dict | None:
    """The checkpoint a search continues from, which must be of the same network."""
    ckpt = load_checkpoint(path, ("search",)) if path else None
    if ckpt and ModelSpec.from_dict(ckpt["spec"]) != spec:
        raise CheckpointError(f"{path} was saved for {ModelSpec.from_dict(ckpt['spec']).describe()}, not "
                              f"{spec.describe()}: resume with the original --dataset/--arch/--depth/--width/"
                              "--model-kwargs")
    return ckpt


def _dense(spec: ModelSpec, detect: DetectConfig, round_to: int):
    """(model, prunable layers, tied channels, bound importance, budget targets) of the dense network,
    traced on the CPU in the default memory format: an unknown architecture or an unprunable model
    fails here."""
    model = create_model(spec)
    example = probe_inputs(spec)
    attach_gates(model)  # heads and neurons: ones until the L1 term moves them
    layers = prunable_layers(model, example, detect.keep_streams)
    if not layers:
        if not prunable_bns(model):
            raise ConfigError(f"{spec.describe()} has no batch-norm layers and no attention heads or MLP neurons "
                              f"earlybird can gate ({_found(model)}): Early-Bird masks come from BN scales or gates")
        raise ConfigError(f"{spec.describe()} has no batch-norm channels the engine can prune"
                          + (": drop --keep-streams" if detect.keep_streams else ""))
    ties = channel_ties(model, example)  # a grouped conv's positions go from all its groups at once
    budgets = [BudgetTarget(metric, f, model, example, ties, detect.min_channels, detect.keep_streams, round_to,
                            kind_ratios=detect.kind_ratios())
               for metric, fractions in (("macs", detect.target_macs), ("params", detect.target_params))
               for f in fractions]
    return model, layers, ties, make_importance(detect.importance).bind(model, example), budgets


def _found(model) -> str:
    """What a network without BNs or gateable structures has instead, for its error line."""
    unsupported = find_gates(model).unsupported
    if unsupported:
        name, why = next(iter(unsupported.items()))
        return f"{len(unsupported)} unsupported modules, e.g. {name}: {why}"
    counts: dict[str, int] = {}
    for m in model.modules():
        if "Norm" in type(m).__name__ or isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return "found " + (", ".join(f"{n} {c}" for c, n in counts.items()) or "no layers it knows")


def _summary(trainer: Trainer, eb: EarlyBirdCallback, spec: ModelSpec, dataset: str, detect: DetectConfig, total: int,
             macs: float, images: int, wall: float) -> dict:
    det, epochs = eb.detector, trainer.optim.epochs
    return {
        "stage": "search", "spec": spec.to_dict(), "dataset": dataset, "ratios": list(det.ratios),
        "budgets": list(det.budgets),
        "prunable_channels": det.num_channels, "bn_channels": total, "keep_streams": detect.keep_streams,
        "number_formats": trainer.precision.lp.describe(), "window": det.window, "threshold": det.threshold,
        "interval_epochs": round(det.interval, 6), "interval_steps": eb.every,
        "importance": det.importance.name, "rule": det.rule.name, "tickets": eb.tickets,
        "closest": {str(r): {"distance": round(d, 4), "epoch": e} for r, (d, e) in det.closest.items()},
        "epochs_trained": trainer.position, "steps_trained": trainer.global_step, "schedule_epochs": epochs,
        "stopped_early": trainer.position < epochs,
        "final_test_acc": trainer.test_acc, "params": count_params(trainer.model), "macs": macs,
        "train_images": images, "wall_s": round(wall, 1), "train_s": round(trainer.train_seconds, 1),
        "memory_format": format_name(trainer.speed.channels_last), "precision": precision_name(trainer.amp_dtype),
    }
