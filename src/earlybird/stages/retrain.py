"""Retrain: train a pruned network to full accuracy (fine-tune the ticket, rewind it to the
pretrained weights, or re-initialize it)."""
from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from ..accel import format_name, precision_name
from ..config import DataConfig, LowPrecisionConfig, ModelCheck, OptimConfig, RetrainConfig, RuntimeConfig
from ..cost import count_macs, count_params
from ..data import Dataset
from ..errors import CheckpointError, ConfigError
from ..models import create_model
from ..progress import Reporter
from ..pretrained import load_pretrained
from ..prune import PrunePlan, apply_plan, prune_model
from ..train import load_checkpoint, model_from_checkpoint
from ..train.callbacks import SWA, SaveBest, Saver
from .common import (check_expected, checkpoint_data, data_meta, make_loaders, make_trainer, probe_inputs,
                     setup_runtime, with_callbacks)
from .rundir import RunDir


def retrain(cfg: RetrainConfig, data: DataConfig, optim: OptimConfig, rt: RuntimeConfig, reporter: Reporter,
            dataset: Dataset | None = None, save: Path | None = None, lowp: LowPrecisionConfig | None = None,
            check: ModelCheck | None = None) -> dict:
    """Train a pruned network to full accuracy: fine-tune the ticket (default), rewind it to the
    pretrained weights its search started from, or re-initialize it."""
    if not cfg.model:
        raise ConfigError("--model is required: pass the pruned.pth written by `earlybird prune`")
    folder = "retrain-reinit" if cfg.reinit else "retrain-pretrained" if cfg.rewind == "pretrained" else "retrain"
    run = RunDir(Path(save or rt.save or Path(cfg.model).parent / folder))
    platform = setup_runtime(rt)
    ckpt = load_checkpoint(cfg.model, ("pruned", "imported"))
    if not ckpt.get("plan"):
        raise CheckpointError(f"{cfg.model} is a dense network: prune it first (earlybird prune --model ...)")
    resume_path = run.prepare(rt.force, rt.resume, reporter)
    model, spec, plan = _network(ckpt, cfg, check)
    first = _first_epoch(cfg, ckpt, optim)
    state = _resumed(resume_path, plan, cfg)
    # a fresh optimizer: the ticket's momentum buffers have the dense shapes, so momentum restarts
    trainer = make_trainer(model, spec, data, optim, rt, lowp, platform, reporter, "retrain", state)
    trainer.epoch = first
    dataset = dataset or checkpoint_data(ckpt, data, cfg.model, platform, reporter, data.train_subset)
    saver = Saver(spec, plan, {"ratio": ckpt.get("ratio"), **data_meta(dataset.info), "input_shape": ckpt["input_shape"]})
    loaders = make_loaders(dataset, data, platform, trainer.speed.channels_last)
    best = SaveBest(saver, run.best, "retrain")
    with_callbacks(trainer, run, saver, "retrain", loaders, rt, best)
    if state:
        trainer.load_state_dict(state, resume_path)
    macs = count_macs(trainer.model, ckpt["input_shape"])
    mode = f"fine-tuned from the ticket (epoch {ckpt.get('epoch')})"
    if cfg.reinit:
        mode = "re-initialized"
    elif cfg.rewind == "pretrained":
        mode = f"from the pretrained weights {ckpt['start']}"
    reporter.line(f"retrain: pruned {spec.describe()} p={ckpt.get('ratio')}, {count_params(trainer.model):,} params, "
                  f"{macs / 1e6:.2f} M MACs/image, {mode}, epochs {trainer.epoch + 1}..{optim.epochs}")
    t0 = time.perf_counter()
    trainer.fit(*loaders)
    summary = _summary(trainer, best, cfg, ckpt.get("ratio"), first, macs, loaders[0].num_samples,
                       time.perf_counter() - t0)
    run.write_summary(summary, trainer.saved_at)
    reporter.line(f"retrain done: final {summary['final_test_acc']:.2f}%, best {best.best['test_acc']:.2f}% "
                  f"(epoch {best.best['epoch']}) -> {run.best}")
    return summary


def _resumed(path: Path | None, plan, cfg: RetrainConfig) -> dict | None:
    """The checkpoint a retrain continues from, which must be of the same pruned network."""
    state = load_checkpoint(path, ("retrain",)) if path else None
    if state and state["plan"] != plan.to_dict():
        raise CheckpointError(f"{path} belongs to another pruned network than {cfg.model}: resume with its --model")
    return state


def _first_epoch(cfg: RetrainConfig, ckpt: dict, optim: OptimConfig) -> int:
    """--start-epoch, by default the ticket's epoch (EB Train continues its schedule), 0 with --reinit
    or --rewind pretrained (a new start)."""
    fresh = cfg.reinit or cfg.rewind == "pretrained"
    first = cfg.start_epoch if cfg.start_epoch is not None else (0 if fresh else int(ckpt.get("epoch") or 0))
    if not 0 <= first < optim.epochs:
        raise ConfigError(f"--start-epoch {first} must be in 0..{optim.epochs - 1} (--epochs {optim.epochs})")
    return first


def _network(ckpt: dict, cfg: RetrainConfig, check: ModelCheck | None):
    """(model, spec, plan) of the pruned checkpoint: its weights, or with --reinit the same pruned
    architecture with fresh weights (and zero folds): "EB Train (re-init)", or with --rewind
    pretrained the weights the search started from, pruned to the ticket's channels."""
    model, spec, plan = model_from_checkpoint(ckpt, cfg.model)
    check_expected(check, spec, cfg.model)
    if cfg.rewind == "pretrained":
        model, plan = _pretrained_pruned(ckpt, spec, plan, cfg.model)
    return (apply_plan(create_model(spec), plan) if cfg.reinit else model), spec, plan


def _pretrained_pruned(ckpt: dict, spec, plan: PrunePlan, path: str) -> tuple[nn.Module, PrunePlan]:
    """The ticket's channels of the weights its search started from: the dense network with those
    weights, pruned to the plan's channels (its folds computed anew from these weights)."""
    source = ckpt.get("start")
    if not source:
        raise ConfigError(f"--rewind pretrained: {path} comes from a search that started from a random init, not "
                          "from --weights or --pretrained: retrain from the ticket (the default) or with --reinit")
    if not Path(source).is_file():
        raise ConfigError(f"--rewind pretrained: the search started from {source}, which is no longer there: put "
                          "the file back, or retrain from the ticket (the default)")
    dense = create_model(spec)
    load_pretrained(dense, source)
    pruned, again = prune_model(dense, plan.masks(dense), probe_inputs(spec))
    if again.keep != plan.keep:  # the engine couples channels as it did for the ticket; a mismatch is a bug
        raise CheckpointError(f"{path}: its channels could not be taken from {source} as the ticket kept them")
    return pruned, again


def _summary(trainer, best: SaveBest, cfg: RetrainConfig, ratio, first: int, macs: float, images: int,
             wall: float) -> dict:
    swa = next(c for c in trainer.callbacks if isinstance(c, SWA))
    return {
        "stage": "retrain", "source": str(cfg.model), "ratio": ratio, "reinit": cfg.reinit, "rewind": cfg.rewind,
        "start_epoch": first, "epochs": trainer.optim.epochs, "epochs_trained": trainer.optim.epochs - first,
        "final_test_acc": trainer.test_acc, "best_test_acc": best.best["test_acc"], "best_epoch": best.best["epoch"],
        "swa_test_acc": swa.test_acc, "number_formats": trainer.precision.lp.describe(),
        "params": count_params(trainer.model), "macs": macs, "train_images": images, "wall_s": round(wall, 1),
        "train_s": round(trainer.train_seconds, 1), "memory_format": format_name(trainer.speed.channels_last),
        "precision": precision_name(trainer.amp_dtype),
    }
