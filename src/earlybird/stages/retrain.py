"""Retrain: train a pruned network to full accuracy (fine-tune the ticket, or re-initialize it)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import DataConfig, LowPrecisionConfig, ModelCheck, OptimConfig, RetrainConfig, RuntimeConfig, validate
from ..cost import count_macs, count_params
from ..data import Dataset, load_dataset
from ..errors import CheckpointError, ConfigError
from ..models import create_model
from ..progress import MetricsLog, Reporter
from ..prune import apply_plan
from ..train import load_checkpoint, model_from_checkpoint, save_checkpoint
from ..train.checkpoint import load_weights
from ..accel import format_name, precision_name
from .common import (BEST, LAST, check_expected, checkpoint_dataset, fit, make_loaders, prepare_save_dir,
                     prepare_training, setup_runtime, write_summary)


def retrain(cfg: RetrainConfig, data: DataConfig, optim: OptimConfig, rt: RuntimeConfig, reporter: Reporter,
            dataset: Dataset | None = None, save: Path | None = None, lowp: LowPrecisionConfig | None = None,
            check: ModelCheck | None = None) -> dict:
    """Train a pruned network to full accuracy: fine-tune the ticket (default) or re-initialize it."""
    validate(data, optim)
    if not cfg.model:
        raise ConfigError("--model is required: pass the pruned.pth written by `earlybird prune`")
    save = Path(save or rt.save or Path(cfg.model).parent / ("retrain-reinit" if cfg.reinit else "retrain"))
    device = setup_runtime(rt)
    ckpt = load_checkpoint(cfg.model, ("pruned", "imported"))
    if not ckpt.get("plan"):
        raise CheckpointError(f"{cfg.model} is a dense network: prune it first (earlybird prune --model ...)")
    resume_path = prepare_save_dir(save, rt.force, rt.resume, reporter)
    model, spec, plan = model_from_checkpoint(ckpt, cfg.model)
    check_expected(check, spec, cfg.model)
    if cfg.reinit:
        # Same pruned architecture, fresh weights (and zero folds): "EB Train (re-init)".
        model = apply_plan(create_model(spec), plan)
    start = cfg.start_epoch if cfg.start_epoch is not None else (0 if cfg.reinit else int(ckpt.get("epoch") or 0))
    if not 0 <= start < optim.epochs:
        raise ConfigError(f"--start-epoch {start} must be in 0..{optim.epochs - 1} (--epochs {optim.epochs})")
    # A fresh optimizer: the ticket's momentum buffers have the dense shapes, so momentum restarts.
    state = load_checkpoint(resume_path, ("retrain",)) if resume_path else None
    model, speed, precision, optimizer = prepare_training(model, spec, data, optim, rt, lowp, device, reporter,
                                                          state.get("speed") if state else None)
    best = {"test_acc": -1.0, "epoch": None}
    progress = {"test_acc": None}
    scaler_state = None
    if state:
        if state["plan"] != plan.to_dict():
            raise CheckpointError(f"{resume_path} belongs to another pruned network than {cfg.model}: resume with its --model")
        load_weights(model, state["state_dict"], resume_path)
        optimizer.load_state_dict(state["optimizer"])
        note = precision.load_state_dict(state.get("precision") or {})
        if note:
            reporter.line(note)
        start, best, scaler_state = state["epoch"], state["best"], state.get("scaler")
        progress["test_acc"] = state["test_acc"]
        torch.set_rng_state(state["rng"])
        reporter.line(f"resuming retrain from {resume_path} after epoch {start}")
    dataset = dataset or load_dataset(checkpoint_dataset(ckpt, data, cfg.model), data.data, data.download, data.train_subset,
                                      rt.seed)
    train, test = make_loaders(dataset, data, device, rt.seed, speed.channels_last)
    shape = ckpt["input_shape"]
    macs = count_macs(model, shape)
    mode = "re-initialized" if cfg.reinit else f"fine-tuned from the ticket (epoch {ckpt.get('epoch')})"
    reporter.line(f"retrain: pruned {spec.describe()} p={ckpt.get('ratio')}, {count_params(model):,} params, "
                  f"{macs / 1e6:.2f} M MACs/image, {mode}, epochs {start + 1}..{optim.epochs}")
    log = MetricsLog(save / "metrics.jsonl", rt.tensorboard)
    meta = {"ratio": ckpt.get("ratio"), "dataset": dataset.info.name, "input_shape": shape}
    first_epoch = start

    def on_epoch_end(epoch, record, scaler):
        if record["test_acc"] > best["test_acc"]:
            best.update(test_acc=record["test_acc"], epoch=epoch)
            save_checkpoint(save / BEST, "retrain", spec, model, plan, epoch=epoch, test_acc=record["test_acc"], **meta)
        save_checkpoint(save / LAST, "retrain", spec, model, plan, epoch=epoch, optimizer=optimizer.state_dict(),
                        best=best, rng=torch.get_rng_state(), test_acc=record["test_acc"],
                        scaler=scaler.state_dict() if scaler else None, precision=precision.state_dict(),
                        speed=speed.state_dict(model), **meta)
        if "swa_test_acc" in record:
            save_checkpoint(save / "swa.pth", "swa", spec, precision.swa.model, plan, epoch=epoch,
                            test_acc=record["swa_test_acc"], **meta)
            progress["swa_test_acc"] = record["swa_test_acc"]
        progress["test_acc"] = record["test_acc"]
        return False, ""

    t0 = time.perf_counter()
    train_seconds = fit(model, optimizer, train, test, optim, rt, device, start, reporter, log, "retrain", on_epoch_end,
                        precision, speed.amp_dtype, scaler_state)
    summary = {
        "stage": "retrain", "source": str(cfg.model), "ratio": ckpt.get("ratio"), "reinit": cfg.reinit,
        "start_epoch": first_epoch, "epochs": optim.epochs, "epochs_trained": optim.epochs - first_epoch,
        "final_test_acc": progress["test_acc"], "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "swa_test_acc": progress.get("swa_test_acc"), "number_formats": precision.lp.describe(),
        "params": count_params(model), "macs": macs, "train_images": train.num_samples,
        "wall_s": round(time.perf_counter() - t0, 1), "train_s": round(train_seconds, 1),
        "memory_format": format_name(speed.channels_last), "precision": precision_name(speed.amp_dtype),
    }
    write_summary(save, summary)
    reporter.line(f"retrain done: final {summary['final_test_acc']:.2f}%, best {best['test_acc']:.2f}% "
                  f"(epoch {best['epoch']}) -> {save / BEST}")
    return summary
