"""Search: train the dense network with BN-scale sparsity until the Early-Bird tickets emerge."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import DataConfig, DetectConfig, LowPrecisionConfig, ModelConfig, OptimConfig, RuntimeConfig, validate
from ..cost import count_macs, count_params
from ..data import Dataset, dataset_info, load_dataset
from ..detector import EarlyBird
from ..errors import CheckpointError, ConfigError
from ..importance import make_importance
from ..masks import bn_gammas, prunable_bns
from ..models import ModelSpec, create_model
from ..progress import MetricsLog, Reporter
from ..prune import channel_ties, prunable_layers
from ..train import distributed, load_checkpoint, save_checkpoint
from ..train.checkpoint import load_weights
from ..accel import format_name, precision_name
from .common import (DEFAULT_DATASET, LAST, default_save, fit, make_loaders, model_spec, prepare_save_dir,
                     prepare_training, probe_inputs, setup_runtime, write_summary)


def search(data: DataConfig, model_cfg: ModelConfig, optim: OptimConfig, detect: DetectConfig, rt: RuntimeConfig,
           reporter: Reporter, dataset: Dataset | None = None, save: Path | None = None,
           lowp: LowPrecisionConfig | None = None) -> dict:
    """Train the dense network with BN-scale sparsity until every ratio's Early-Bird ticket emerges."""
    validate(data, optim, detect)
    data = replace(data, dataset=data.dataset or DEFAULT_DATASET)
    save = Path(save or rt.save or default_save(data, model_cfg))
    device = setup_runtime(rt)
    spec = model_spec(model_cfg, dataset.info if dataset else dataset_info(data.dataset, data.data))
    model = create_model(spec)  # before the data: an unknown --arch or --depth fails at once
    # traced on the CPU in the default memory format, before the data: an unprunable model fails at once too
    layers = prunable_layers(model, probe_inputs(spec), detect.keep_streams)
    if not layers:
        raise ConfigError(f"{spec.describe()} has no batch-norm channels the engine can prune"
                          + (": drop --keep-streams" if detect.keep_streams else ""))
    ties = channel_ties(model, probe_inputs(spec))  # a grouped conv's positions go from all its groups at once
    importance = make_importance(detect.importance).bind(model, probe_inputs(spec))
    resume_path = prepare_save_dir(save, rt.force, rt.resume, reporter)
    dataset = dataset or load_dataset(data.dataset, data.data, data.download, data.train_subset, rt.seed)
    info = dataset.info
    ckpt = load_checkpoint(resume_path, ("search",)) if resume_path else None
    model, speed, precision, optimizer = prepare_training(model, spec, data, optim, rt, lowp, device, reporter,
                                                          ckpt.get("speed") if ckpt else None)
    detector = EarlyBird(model, detect.ratios, detect.eb_window, detect.eb_threshold, detect.min_channels, layers,
                         ties, importance, detect.eb_rule)
    scores = [detector.scores()]
    start, scaler_state, tickets = 0, None, {}
    progress = {"epoch": 0, "test_acc": None}
    if ckpt:
        if ckpt["spec"] != spec.to_dict():
            raise CheckpointError(f"{resume_path} was saved for {ModelSpec.from_dict(ckpt['spec']).describe()}, not "
                                  f"{spec.describe()}: resume with the original --dataset/--arch/--depth/--width")
        load_weights(model, ckpt["state_dict"], resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        detector.load_state_dict(ckpt["detector"])
        note = precision.load_state_dict(ckpt.get("precision") or {})
        if note:
            reporter.line(note)
        scores = list(ckpt["scores"] if "scores" in ckpt else ckpt["gammas"])
        start, scaler_state, tickets = ckpt["epoch"], ckpt.get("scaler"), ckpt["tickets"]
        progress.update(epoch=start, test_acc=ckpt["test_acc"])
        torch.set_rng_state(ckpt["rng"])
        reporter.line(f"resuming search from {resume_path} after epoch {start}")
    train, test = make_loaders(dataset, data, device, rt.seed, speed.channels_last)
    macs = count_macs(model, (info.in_channels, info.image_size, info.image_size))
    total = sum(m.weight.numel() for _, m in prunable_bns(model))
    reporter.line(f"search: {spec.describe()}, {count_params(model):,} params, {macs / 1e6:.1f} M MACs/image, "
                  f"{train.num_samples:,} training images on {device}; ratios are of the {detector.num_channels} "
                  f"prunable BN channels ({len(layers)} layers; {total} BN channels in all)")
    meta = {"dataset": info.name, "input_shape": [info.in_channels, info.image_size, info.image_size],
            "layers": layers, "keep_streams": detect.keep_streams, "importance": importance.name}
    log = MetricsLog(save / "metrics.jsonl", rt.tensorboard)

    def on_epoch_end(epoch, record, scaler):
        scores.append(detector.scores())
        distributed.check_agree(scores[-1], "the channel scores")
        emerged = detector.step(epoch, scores[-1])
        g = bn_gammas(detector.index.bns(model))
        record["gamma"] = {"mean": round(g.mean().item(), 5), "below_0.01": round((g < 0.01).float().mean().item(), 4)}
        record["distances"] = {str(r): [round(d, 4) for d in detector.distances[r]] for r in detector.ratios}
        for r in emerged:
            path = save / f"EB-{round(r * 100)}-{epoch}.pth"
            save_checkpoint(path, "ticket", spec, model, ratio=r, epoch=epoch, mask=detector.tickets[r],
                            test_acc=record["test_acc"], **meta)
            tickets[str(r)] = {"epoch": epoch, "path": path.name, "test_acc": record["test_acc"]}
        stop = detector.done and not detect.full
        save_checkpoint(save / LAST, "search", spec, model, epoch=epoch, optimizer=optimizer.state_dict(),
                        detector=detector.state_dict(), scores=torch.stack(scores), tickets=tickets,
                        rng=torch.get_rng_state(), scaler=scaler.state_dict() if scaler else None,
                        precision=precision.state_dict(), test_acc=record["test_acc"],
                        speed=speed.state_dict(model), **meta)
        if "swa_test_acc" in record:
            save_checkpoint(save / "swa.pth", "swa", spec, precision.swa.model, epoch=epoch,
                            test_acc=record["swa_test_acc"], **meta)
        progress.update(epoch=epoch, test_acc=record["test_acc"])
        dist = "  ".join(
            f"d{r:g}=" + ("-" if not detector.distances[r] else f"{max(detector.distances[r]):.3f}")
            + ("*" if r in detector.emerged else "")
            for r in detector.ratios
        )
        return stop, f"  | max dist {dist}" + "".join(f"  -> EB ticket p={r:g} at epoch {epoch}" for r in emerged)

    t0 = time.perf_counter()
    train_seconds = fit(model, optimizer, train, test, optim, rt, device, start, reporter, log, "search",
                        on_epoch_end, precision, speed.amp_dtype, scaler_state)
    epochs_done = progress["epoch"]
    summary = {
        "stage": "search", "spec": spec.to_dict(), "dataset": info.name, "ratios": list(detector.ratios),
        "prunable_channels": detector.num_channels, "bn_channels": total, "keep_streams": detect.keep_streams,
        "number_formats": precision.lp.describe(),
        "window": detector.window, "threshold": detector.threshold, "importance": importance.name,
        "rule": detector.rule.name, "tickets": tickets,
        "epochs_trained": epochs_done, "schedule_epochs": optim.epochs, "stopped_early": epochs_done < optim.epochs,
        "final_test_acc": progress["test_acc"], "params": count_params(model), "macs": macs,
        "train_images": train.num_samples, "wall_s": round(time.perf_counter() - t0, 1),
        "train_s": round(train_seconds, 1), "memory_format": format_name(speed.channels_last),
        "precision": precision_name(speed.amp_dtype),
    }
    write_summary(save, summary)
    for r in detector.ratios:
        t = tickets.get(str(r))
        reporter.line(f"  p={r:g}: " + (f"EB ticket at epoch {t['epoch']}/{optim.epochs} -> {save / t['path']}"
                                         if t else f"no ticket within {epochs_done} epochs"))
    return summary
