"""The commands that read a checkpoint without training it: import-reference, eval and export."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from ..config import DataConfig, EvalConfig, ExportConfig, ImportConfig, ModelCheck, ModelConfig, RuntimeConfig
from ..cost import count_macs, count_params
from ..data import DATASETS, dataset_info
from ..errors import CheckpointError, ConfigError, RunDirError
from ..export import FORMATS, export_model, max_difference
from ..progress import Reporter
from ..reference import classes_of, import_reference, read_pair, read_reference
from ..train import evaluate, load_checkpoint, model_from_checkpoint, save_checkpoint
from ..accel import autocast_dtype
from .common import check_expected, checkpoint_data, make_loader, model_spec, setup_runtime


def import_reference_checkpoint(cfg: ImportConfig, model_cfg: ModelConfig, rt: RuntimeConfig, reporter: Reporter,
                                warn) -> Path:
    """Convert a reference-implementation checkpoint (full unpickling, after ``warn``), or the EVAL
    scripts' pair of files, to earlybird's format."""
    if cfg.model and (cfg.scratch or cfg.resume):
        raise ConfigError("--model is one checkpoint, --scratch and --resume the EVAL scripts' pair: pass one or the "
                          "other")
    source = cfg.model or cfg.resume or cfg.scratch
    if not source:
        raise ConfigError("--model is required: pass the reference checkpoint (.pth.tar) to convert, or --scratch "
                          "pruned.pth.tar --resume model_best.pth.tar as the EVAL scripts take them")
    out = Path(cfg.out) if cfg.out else Path(source).with_name(Path(source).name.split(".")[0] + ".earlybird.pth")
    if out.exists() and not rt.force:
        raise RunDirError(f"{out} exists: choose another --out or pass --force to overwrite it")
    files = [f for f in (cfg.model, cfg.scratch, cfg.resume) if f]
    warn(f"warning: unpickling {' and '.join(files)} in full: a pickle can run code, so import only files you trust")
    obj = read_reference(cfg.model) if cfg.model else read_pair(cfg.scratch, cfg.resume)
    info, classes = dataset_info(cfg.dataset), classes_of(obj)
    if cfg.dataset == "imagenet" and classes:  # ImageNet's class count is the folder's: the fc knows it
        info = replace(info, num_classes=classes)
    spec = model_spec(model_cfg, info)
    model, plan = import_reference(obj, spec, " and ".join(files))
    shape = [spec.in_channels, spec.image_size, spec.image_size]
    save_checkpoint(out, "imported", spec, model, plan, source=" ".join(files), epoch=obj.get("epoch"),
                    test_acc=obj.get("best_prec1"), dataset=cfg.dataset, input_shape=shape)
    reporter.line(f"imported {' and '.join(files)} as {'a pruned' if plan else 'a dense'} {spec.describe()} "
                  f"({count_params(model):,} params, epoch {obj.get('epoch')}) -> {out}")
    return out


def export_checkpoint(cfg: ExportConfig, rt: RuntimeConfig, reporter: Reporter, check: ModelCheck | None = None) -> Path:
    """Write a checkpoint's network as a file that deploys without earlybird, and check it against
    the network itself."""
    if not cfg.model:
        raise ConfigError("--model is required: pass any checkpoint earlybird wrote (pruned.pth, model_best.pth, ...)")
    ckpt = load_checkpoint(cfg.model)
    model, spec, plan = model_from_checkpoint(ckpt, cfg.model)
    check_expected(check, spec, cfg.model)
    out = Path(cfg.out) if cfg.out else Path(cfg.model).with_suffix(FORMATS[cfg.format])
    if out.exists() and not rt.force:
        raise RunDirError(f"{out} exists: choose another --out or pass --force to overwrite it")
    shape = ckpt.get("input_shape", [spec.in_channels, spec.image_size, spec.image_size])
    g = torch.Generator().manual_seed(0)  # the check's inputs: any will do, the same each time
    export_model(model, torch.randn(2, *shape, generator=g), out, cfg.format, _export_metadata(ckpt, spec, shape))
    diff = max_difference(out, cfg.format, model, torch.randn(3, *shape, generator=g))  # another batch size
    checked = "not checked: pip install onnxruntime" if diff is None else f"largest output difference {diff:.1e}"
    reporter.line(f"exported {cfg.model} ({'pruned ' if plan else ''}{spec.describe()}, {count_params(model):,} params) "
                  f"as {cfg.format} -> {out} ({checked}, relative, on a batch of 3)")
    return out


def _export_metadata(ckpt: dict, spec, shape) -> dict:
    """What a deployment needs to feed the exported network: the input's shape, channel order and
    normalization, and the class names where the data named them."""
    name = ckpt.get("dataset")
    info = ckpt.get("data_info") or (DATASETS[name].to_dict() if name in DATASETS else None)
    meta = {"network": spec.describe(), "input_shape": list(shape), "dataset": name}
    if info:
        meta.update({"channels": "RGB" if info["in_channels"] == 3 else "grayscale",
                     "normalize": "(pixel / 255 - mean) / std, per channel", "mean": info["mean"], "std": info["std"],
                     "classes": info.get("classes") or None})
    return meta


def evaluate_checkpoint(cfg: EvalConfig, data: DataConfig, rt: RuntimeConfig, reporter: Reporter,
                        check: ModelCheck | None = None) -> dict:
    """Top-1/top-5, parameters and MACs of any earlybird checkpoint on its dataset's test split."""
    if not cfg.model:
        raise ConfigError("--model is required: pass any checkpoint earlybird wrote (EB-*.pth, pruned.pth, model_best.pth)")
    platform = setup_runtime(rt)
    device = platform.device
    ckpt = load_checkpoint(cfg.model)
    model, spec, plan = model_from_checkpoint(ckpt, cfg.model)
    check_expected(check, spec, cfg.model)
    # evaluation is too short to pay for timing the settings: auto means off here
    channels_last, amp_dtype = rt.channels_last == "on", autocast_dtype(rt, device) if rt.amp == "on" else None
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    dataset = checkpoint_data(ckpt, data, cfg.model, platform, reporter)
    if (dataset.info.in_channels, dataset.info.num_classes) != (spec.in_channels, spec.num_classes):
        raise CheckpointError(f"{cfg.model} has {spec.num_classes} classes and {spec.in_channels} input channels, the "
                              f"data in {data.root} {dataset.info.num_classes} and {dataset.info.in_channels}: "
                              "pass the --data it was trained on")
    test = make_loader(dataset, data, platform, channels_last, train=False)
    result = evaluate(model, test, amp_dtype)
    shape = ckpt.get("input_shape", [spec.in_channels, spec.image_size, spec.image_size])
    summary = {"model": str(cfg.model), "kind": ckpt["kind"], "dataset": dataset.info.name, "pruned": plan is not None,
               "test_images": test.num_samples, "top1": result.top1, "top5": result.top5, "loss": result.loss,
               "params": count_params(model), "macs": count_macs(model, shape)}
    reporter.line(f"{cfg.model} ({ckpt['kind']}{', pruned' if plan else ''} {spec.describe()}) on {dataset.info.name} "
                  f"test ({summary['test_images']:,} images): top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
                  f"loss {result.loss:.4f}  {summary['params']:,} params  {summary['macs'] / 1e6:.2f} M MACs")
    reporter.line(json.dumps(summary))
    return summary
