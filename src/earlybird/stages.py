"""The three stages of Early-Bird training (search, prune, retrain) and the whole pipeline.

Each stage takes typed configs and a Reporter, writes its outputs under its save directory and
returns a plain dict summary (also written as summary.json, which marks the stage finished).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import (DataConfig, DetectConfig, EvalConfig, ImportConfig, LowPrecisionConfig, ModelCheck, ModelConfig,
                     OptimConfig, PruneConfig, PruneOptions, RetrainConfig, RuntimeConfig, validate, validate_lowp,
                     validate_prune, validate_runtime)
from .cost import count_macs, count_params, inference_throughput, training_macs
from .data import (BatchLoader, Dataset, DatasetInfo, FolderDataset, FolderLoader, InputTransform, dataset_info,
                   load_dataset)
from .detector import EarlyBird
from .errors import CheckpointError, ConfigError, RunDirError
from .masks import bn_gammas, channel_mask, check_ratio, prunable_bns
from .models import ModelSpec, create_model, resolve_arch
from .lowp import LowPrecision, Precision
from .progress import MetricsLog, Reporter, format_seconds
from .reference import import_reference, read_reference
from .prune import apply_mask, apply_plan, prunable_layers, prune_model
from .train import distributed, evaluate, load_checkpoint, lr_at, model_from_checkpoint, save_checkpoint, train_epoch
from .train.checkpoint import load_weights
from .train.tuning import channels_last_hazards, faster_memory_format, format_timings, keep_freed_memory

SUMMARY = "summary.json"
LAST = "checkpoint.pth"  # the reference scripts' names: checkpoint, model_best, EB-<p>-<epoch>, pruned
BEST = "model_best.pth"


# ----------------------------------------------------------------------------- runtime helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", distributed.world().local_rank)  # torchrun: one GPU per process
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


DEFAULT_DATASET = "fashion-mnist"


def check_expected(check: ModelCheck | None, spec: ModelSpec, path) -> None:
    """--arch/--depth given to a command that reads the model from a checkpoint must match it."""
    if check is None or (check.arch is None and check.depth is None):
        return
    # resolve_arch gives depth 0 to architectures without one, as model_spec did for the checkpoint
    arch, depth = resolve_arch(check.arch or spec.arch, check.depth if check.depth is not None else spec.depth)
    if (arch, depth) != (spec.arch, spec.depth):
        raise CheckpointError(f"{path} holds {spec.describe()}, not {arch}{depth or ''}: drop --arch/--depth (the "
                              "checkpoint names its architecture) or pass the right checkpoint")


def checkpoint_dataset(ckpt: dict, data: DataConfig, path) -> str:
    """The dataset a checkpoint was trained on; an explicit, different --dataset is an error."""
    name = ckpt.get("dataset")
    if name and data.dataset and data.dataset != name:
        raise CheckpointError(f"{path} was trained on {name}, not {data.dataset}: drop --dataset or pass --dataset {name}")
    return name or data.dataset or DEFAULT_DATASET


def setup_runtime(rt: RuntimeConfig) -> torch.device:
    validate_runtime(rt)
    if rt.gpu_ids:  # one id: that GPU; several: this is one of the workers launch_on_gpus started
        ids = distributed.parse_gpu_ids(rt.gpu_ids) if "WORLD_SIZE" not in os.environ else []
        rt = replace(rt, device=f"cuda:{ids[0]}" if len(ids) == 1 else "auto")
    wants_cuda = rt.device.startswith("cuda") or (rt.device == "auto" and torch.cuda.is_available())
    distributed.init_from_env(wants_cuda)
    device = resolve_device(rt.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rt.amp and device.type != "cuda":
        raise ConfigError("--amp needs a CUDA device (float16 on a CPU is slower than float32): drop --amp")
    if rt.threads:
        torch.set_num_threads(rt.threads)
    if rt.keep_memory and device.type == "cpu":
        keep_freed_memory()
    if rt.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    random.seed(rt.seed)
    torch.manual_seed(rt.seed)
    return device


def _artifacts(save: Path) -> list[Path]:
    names = [SUMMARY, LAST, BEST, "swa.pth", "pruned.pth", "metrics.jsonl", "summary.txt"]
    return [save / n for n in names if (save / n).exists()] + sorted(save.glob("EB-*.pth"))


def prepare_save_dir(save: Path, force: bool, resume: str | None = None, reporter: Reporter | None = None) -> Path | None:
    """Refuse to clobber a finished run; return the checkpoint to continue from, if any. An
    unfinished run in ``save`` is continued (as with --resume) unless --force starts it over."""
    if distributed.is_main() and save.is_dir():
        for stale in save.glob(".*.tmp"):  # a write cut short by a kill; the file it meant to replace is intact
            stale.unlink(missing_ok=True)
    if resume is not None:
        path = Path(resume) if resume else save / LAST
        if (save / SUMMARY).exists() and not resume:
            raise RunDirError(f"{save} holds a finished run: nothing to resume (use --force to start it over)")
        if not path.is_file():
            raise RunDirError(f"no checkpoint to resume at {path}: start without --resume")
        return path
    if save.exists() and not save.is_dir():
        raise RunDirError(f"--save {save} is a file, not a directory: choose another --save")
    finished = (save / SUMMARY).exists() or (save / "pruned.pth").exists()
    if finished and not force:
        raise RunDirError(f"{save} holds a finished run: choose another --save or pass --force to overwrite it")
    if (save / LAST).exists() and not force:
        if reporter:
            reporter.line(f"{save} holds an unfinished run: continuing it (pass --force to start over)")
        return save / LAST
    if distributed.is_main():
        try:
            if force:
                for p in _artifacts(save):
                    p.unlink()
            save.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot write in --save {save} ({exc.strerror or exc}): choose another --save") from None
    distributed.barrier()
    return None


def model_spec(model_cfg: ModelConfig, info: DatasetInfo) -> ModelSpec:
    """The dense network of a run: the model flags plus the dataset's input and class counts."""
    arch, depth = resolve_arch(model_cfg.arch, model_cfg.depth)
    return ModelSpec(arch, depth, model_cfg.width, info.in_channels, info.num_classes, info.image_size)


def probe_inputs(spec: ModelSpec, n: int = 4) -> torch.Tensor:
    """Random inputs of the model's shape for tracing its graph (a private generator: the run's
    random stream stays as the seed made it)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, spec.in_channels, spec.image_size, spec.image_size, generator=g)


def default_save(data: DataConfig, model_cfg: ModelConfig) -> Path:
    return Path("runs") / f"{data.dataset or DEFAULT_DATASET}-{model_cfg.arch}{model_cfg.depth}"


def write_summary(save: Path, summary: dict) -> None:
    """Mark a stage finished (rank 0 writes; every worker waits, so all can read what it wrote)."""
    if distributed.is_main():
        tmp = save / f".{SUMMARY}.tmp"
        try:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(tmp, save / SUMMARY)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise RunDirError(f"could not write {save / SUMMARY} ({exc.strerror or exc}): free disk space, then run "
                              "the same command again") from None
    distributed.barrier()


def make_loaders(dataset: Dataset | FolderDataset, data: DataConfig, device, seed: int, channels_last: bool):
    w = distributed.world()
    transform = InputTransform(data.filter, data.sigma, data.sparsify_gt)
    for flag, size in (("--batch-size", data.batch_size), ("--test-batch-size", data.test_batch_size)):
        if size % w.size:
            raise ConfigError(f"{flag} {size} is the global batch: it must divide among the {w.size} workers")
    if isinstance(dataset, FolderDataset):
        return tuple(FolderLoader(split, bs, dataset.info, train, device, seed, channels_last, data.workers, w.rank,
                                  w.size, transform)
                     for split, bs, train in ((dataset.train, data.batch_size, True),
                                              (dataset.test, data.test_batch_size, False)))
    train = BatchLoader(dataset.train_images, dataset.train_labels, data.batch_size, dataset.info, True, device, seed,
                        channels_last, w.rank, w.size, transform)
    test = BatchLoader(dataset.test_images, dataset.test_labels, data.test_batch_size, dataset.info, False, device, seed,
                       channels_last, w.rank, w.size, transform)
    return train, test


def for_workers(model, rt: RuntimeConfig, device):
    """With several workers and --sync-bn, batch statistics over the whole global batch."""
    if rt.sync_bn and distributed.world().active:
        return distributed.sync_batchnorm(model, device)
    return model


def low_precision(lowp: LowPrecisionConfig) -> LowPrecision:
    return LowPrecision(lowp.wl_weight, lowp.wl_grad, lowp.wl_activate, lowp.wl_error, lowp.wl_momentum, lowp.rounding)


def make_precision(lowp: LowPrecisionConfig | None, optim: OptimConfig, rt: RuntimeConfig, model, device,
                   spec: ModelSpec) -> Precision:
    """Quantizer hooks, optimizer wrapper and SWA of a stage (all off at full precision)."""
    lowp = lowp or LowPrecisionConfig()
    validate_lowp(lowp, optim)
    lp = low_precision(lowp)
    if lp.active and rt.amp:
        raise ConfigError("--amp and the --wl-* low-precision formats do not mix: choose one")
    return Precision(lp, model, device, rt.seed, probe_inputs(spec, 2), lowp.swa, lowp.swa_start)


def _format_name(channels_last: bool) -> str:
    return "channels-last" if channels_last else "contiguous"


def choose_memory_format(rt: RuntimeConfig, model, spec: ModelSpec, batch_size: int, device, reporter: Reporter) -> bool:
    """Whether to train in channels-last: as --channels-last says, or (auto) whichever format is faster here."""
    hazards = channels_last_hazards(model) if device.type == "cpu" else []
    if rt.channels_last == "on" and hazards:
        raise ConfigError(f"--channels-last on: layer '{hazards[0]}' (a 1x1 strided convolution with under 16 input "
                          "channels) gets wrong gradients or crashes in channels-last on CPUs (oneDNN issue 6035): "
                          "use --channels-last off")
    if rt.channels_last != "auto":
        return rt.channels_last == "on"
    if rt.deterministic:  # a timing can come out either way, and the two formats round differently
        return False
    if hazards:
        reporter.line(f"memory format: contiguous (channels-last would break layer '{hazards[0]}' on this CPU)")
        return False
    per_worker = max(1, batch_size // distributed.world().size)
    faster, speedup = faster_memory_format(model, (spec.in_channels, spec.image_size, spec.image_size),
                                           spec.num_classes, per_worker, device, autocast_dtype(rt))
    reporter.line(f"memory format: {_format_name(faster)} (channels-last trains at {speedup:.2f}x "
                  "the speed of contiguous on this device; --channels-last on/off fixes it)")
    return faster


def make_optimizer(model, optim: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def autocast_dtype(rt: RuntimeConfig) -> torch.dtype | None:
    if not rt.amp:
        return None
    bf16 = rt.amp_dtype == "bf16" or (rt.amp_dtype == "auto" and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if bf16 else torch.float16


def _amp(rt: RuntimeConfig, device):
    """(GradScaler or None, autocast dtype or None): bf16 needs no loss scaling, fp16 does."""
    dtype = autocast_dtype(rt)
    return (torch.amp.GradScaler(device.type) if dtype == torch.float16 else None), dtype


def _fit(model, optimizer, train, test, optim: OptimConfig, rt: RuntimeConfig, device, start: int, reporter: Reporter,
         log: MetricsLog, stage: str, on_epoch_end, precision: Precision, scaler_state=None) -> float:
    """The epoch loop of every stage. ``on_epoch_end(epochs_done, record, scaler) -> (stop, note)``
    saves what the stage keeps, may stop early, and adds a note to the epoch's line."""
    scaler, amp_dtype = _amp(rt, device)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    l1 = optim.s if optim.sparsity_regularization else 0.0
    net = distributed.wrap(model, device)  # DDP with several workers; evaluation needs no wrapper
    if rt.compile:
        net = torch.compile(net)
    wall = 0.0
    for epoch in range(start, optim.epochs):
        lr = lr_at(epoch, optim.lr, optim.schedule, optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train.set_epoch(epoch)
        update, close = reporter.epoch_bar(len(train), f"{stage} {epoch + 1}/{optim.epochs}")
        try:
            result = train_epoch(net, train, optimizer, l1=l1, scaler=scaler, amp_dtype=amp_dtype, on_batch=update)
        finally:
            close()
        result_test = evaluate(model, test, amp_dtype)
        test_loss, test_acc = result_test.loss, result_test.top1
        wall += result.seconds
        record = {
            "stage": stage, "epoch": epoch + 1, "lr": lr, "train_loss": round(result.loss, 5),
            "train_acc": round(result.accuracy, 3), "test_loss": round(test_loss, 5), "test_acc": round(test_acc, 3),
            "images_per_s": round(result.images_per_second, 1), "epoch_s": round(result.seconds, 2),
        }
        averaged = precision.average(epoch + 1, model, train)
        if averaged is not None:
            record["swa_test_acc"] = round(evaluate(averaged, test).top1, 3)
        stop, note = on_epoch_end(epoch + 1, record, scaler)
        if averaged is not None:
            note = f"  swa {record['swa_test_acc']:.2f}%" + note
        left = (optim.epochs - epoch - 1) * wall / (epoch + 1 - start)
        log.write(**record)
        reporter.line(
            f"{stage} epoch {epoch + 1}/{optim.epochs}  lr {lr:.3g}  loss {result.loss:.3f}  "
            f"train {result.accuracy:.1f}%  test {test_acc:.2f}%  {result.images_per_second:.0f} img/s  "
            f"{result.seconds:.0f}s{'' if stop else f'  ~{format_seconds(left)} left'}{note}"
        )
        if stop:
            break
    return wall


# ----------------------------------------------------------------------------- search

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
    resume_path = prepare_save_dir(save, rt.force, rt.resume, reporter)
    dataset = dataset or load_dataset(data.dataset, data.data, data.download, data.train_subset, rt.seed)
    info = dataset.info
    model = for_workers(model.to(device), rt, device)
    channels_last = choose_memory_format(rt, model, spec, data.batch_size, device, reporter)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = make_precision(lowp, optim, rt, model, device, spec)
    optimizer = precision.optimizer(make_optimizer(model, optim))
    detector = EarlyBird(model, detect.ratios, detect.eb_window, detect.eb_threshold, detect.min_channels, layers)
    gammas = [bn_gammas(detector._bns)]
    start, scaler_state, tickets = 0, None, {}
    progress = {"epoch": 0, "test_acc": None}
    if resume_path:
        ckpt = load_checkpoint(resume_path, ("search",))
        if ckpt["spec"] != spec.to_dict():
            raise CheckpointError(f"{resume_path} was saved for {ModelSpec.from_dict(ckpt['spec']).describe()}, not "
                                  f"{spec.describe()}: resume with the original --dataset/--arch/--depth/--width")
        load_weights(model, ckpt["state_dict"], resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        detector.load_state_dict(ckpt["detector"])
        precision.load_state_dict(ckpt.get("precision") or {})
        gammas = list(ckpt["gammas"])
        start, scaler_state, tickets = ckpt["epoch"], ckpt.get("scaler"), ckpt["tickets"]
        progress.update(epoch=start, test_acc=ckpt["test_acc"])
        torch.set_rng_state(ckpt["rng"])
        reporter.line(f"resuming search from {resume_path} after epoch {start}")
    train, test = make_loaders(dataset, data, device, rt.seed, channels_last)
    macs = count_macs(model, (info.in_channels, info.image_size, info.image_size))
    total = sum(m.weight.numel() for _, m in prunable_bns(model))
    reporter.line(f"search: {spec.describe()}, {count_params(model):,} params, {macs / 1e6:.1f} M MACs/image, "
                  f"{train.num_samples:,} training images on {device}; ratios are of the {detector.num_channels} "
                  f"prunable BN channels ({len(layers)} layers; {total} BN channels in all)")
    meta = {"dataset": info.name, "input_shape": [info.in_channels, info.image_size, info.image_size],
            "layers": layers, "keep_streams": detect.keep_streams}
    log = MetricsLog(save / "metrics.jsonl", rt.tensorboard)

    def on_epoch_end(epoch, record, scaler):
        distributed.check_agree(bn_gammas(detector._bns), "the BN scales")
        emerged = detector.step(epoch)
        gammas.append(bn_gammas(detector._bns))
        g = gammas[-1]
        record["gamma"] = {"mean": round(g.mean().item(), 5), "below_0.01": round((g < 0.01).float().mean().item(), 4)}
        record["distances"] = {str(r): [round(d, 4) for d in detector.distances[r]] for r in detector.ratios}
        for r in emerged:
            path = save / f"EB-{round(r * 100)}-{epoch}.pth"
            save_checkpoint(path, "ticket", spec, model, ratio=r, epoch=epoch, mask=detector.tickets[r],
                            test_acc=record["test_acc"], **meta)
            tickets[str(r)] = {"epoch": epoch, "path": path.name, "test_acc": record["test_acc"]}
        stop = detector.done and not detect.full
        save_checkpoint(save / LAST, "search", spec, model, epoch=epoch, optimizer=optimizer.state_dict(),
                        detector=detector.state_dict(), gammas=torch.stack(gammas), tickets=tickets,
                        rng=torch.get_rng_state(), scaler=scaler.state_dict() if scaler else None,
                        precision=precision.state_dict(), test_acc=record["test_acc"], **meta)
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
    train_seconds = _fit(model, optimizer, train, test, optim, rt, device, start, reporter, log, "search",
                         on_epoch_end, precision, scaler_state)
    epochs_done = progress["epoch"]
    summary = {
        "stage": "search", "spec": spec.to_dict(), "dataset": info.name, "ratios": list(detector.ratios),
        "prunable_channels": detector.num_channels, "bn_channels": total, "keep_streams": detect.keep_streams,
        "number_formats": precision.lp.describe(),
        "window": detector.window, "threshold": detector.threshold, "tickets": tickets,
        "epochs_trained": epochs_done, "schedule_epochs": optim.epochs, "stopped_early": epochs_done < optim.epochs,
        "final_test_acc": progress["test_acc"], "params": count_params(model), "macs": macs,
        "train_images": train.num_samples, "wall_s": round(time.perf_counter() - t0, 1),
        "train_s": round(train_seconds, 1), "memory_format": _format_name(channels_last),
    }
    write_summary(save, summary)
    for r in detector.ratios:
        t = tickets.get(str(r))
        reporter.line(f"  p={r:g}: " + (f"EB ticket at epoch {t['epoch']}/{optim.epochs} -> {save / t['path']}"
                                         if t else f"no ticket within {epochs_done} epochs"))
    return summary


# ----------------------------------------------------------------------------- prune

def _per_layer_channels(model) -> dict[str, int]:
    return {n: m.weight.numel() for n, m in prunable_bns(model)}


def _ticket_mask(ckpt: dict, dense, percent: float | None, min_channels: int, example) -> dict[str, torch.Tensor]:
    """The ticket's own mask, or one recomputed at ``percent`` over the same prunable layers."""
    layers = ckpt.get("layers") or prunable_layers(dense, example, ckpt.get("keep_streams", False))
    bns = dict(prunable_bns(dense))
    if percent is None and "mask" in ckpt:
        mask = ckpt["mask"]
    else:
        mask = channel_mask(bn_gammas([bns[n] for n in layers]), check_ratio(percent or ckpt.get("ratio", 0.5)),
                            [bns[n].weight.numel() for n in layers], min_channels)
    return dict(zip(layers, torch.split(mask, [bns[n].weight.numel() for n in layers])))


def latency_table(dense, pruned, shape, batch_sizes, device) -> dict:
    """Measured inference images/s of the dense and the pruned network, side by side."""
    rows = {}
    for b in batch_sizes:
        d, p = (inference_throughput(m, shape, b, device) for m in (dense, pruned))
        rows[str(b)] = {"dense": round(d, 1), "pruned": round(p, 1), "speedup": round(p / d, 3)}
    return rows


def training_table(dense, pruned, shape, num_classes: int, batch_size: int, device) -> dict:
    """Measured training images/s of the dense and the pruned network at ``batch_size``, each in its
    faster memory format: what the retrain gains per image, which fewer MACs only promise."""
    rows = {"batch": batch_size}
    for name, model in (("dense", dense), ("pruned", pruned)):
        seconds = format_timings(model, shape, num_classes, batch_size, device)
        channels_last = min(seconds, key=seconds.get)
        rows[name] = {"images_per_s": round(batch_size / seconds[channels_last], 1),
                      "format": _format_name(channels_last)}
    rows["speedup"] = round(rows["pruned"]["images_per_s"] / rows["dense"]["images_per_s"], 3)
    return rows


def prune(cfg: PruneConfig, options: PruneOptions, save: Path | None, data: DataConfig, rt: RuntimeConfig,
          reporter: Reporter, dataset: Dataset | None = None, check: ModelCheck | None = None) -> dict:
    """Physically prune an EB ticket (or a search checkpoint) and report what changed."""
    validate_prune(options)
    if not cfg.model:
        raise ConfigError("--model is required: pass an EB ticket such as runs/x/EB-30-12.pth")
    device = setup_runtime(rt)
    ckpt = load_checkpoint(cfg.model, ("ticket", "search", "imported"))
    if ckpt.get("plan"):
        raise CheckpointError(f"{cfg.model} is already pruned: retrain it, or prune its dense ticket")
    ratio = check_ratio(cfg.percent if cfg.percent is not None else ckpt.get("ratio", 0.5))
    save = Path(save or rt.save or Path(cfg.model).parent / f"pruned-{round(ratio * 100)}")
    prepare_save_dir(save, rt.force)
    dense, spec, _ = model_from_checkpoint(ckpt, cfg.model)
    check_expected(check, spec, cfg.model)
    dense = dense.to(device).eval()
    dataset = dataset or load_dataset(checkpoint_dataset(ckpt, data, cfg.model), data.data, data.download)
    _, test = make_loaders(dataset, data, device, rt.seed, False)
    example = next(iter(test))[0][:8]
    requested = _ticket_mask(ckpt, dense, cfg.percent, cfg.min_channels, example)
    keep_streams = bool(ckpt.get("keep_streams", False))
    pruned, plan = prune_model(dense, requested, example, keep_streams, options.round_to)
    masked = apply_mask(dense, plan.masks(dense))
    with torch.no_grad():
        out_diff = (pruned.eval()(example) - masked.eval()(example)).abs().max().item()
    shape = ckpt.get("input_shape", list(example.shape[1:]))
    before, after = _per_layer_channels(dense), _per_layer_channels(pruned)
    prunable = sum(int(m.numel()) for m in requested.values())
    asked = sum(int((~m).sum()) for m in requested.values())
    results = {name: evaluate(model, test) for name, model in (("dense", dense), ("masked", masked), ("pruned", pruned))}
    report = {
        "stage": "prune", "source": str(cfg.model), "ratio": ratio, "epoch": ckpt.get("epoch"),
        "keep_streams": keep_streams, "round_to": options.round_to,
        "channels": {"before": sum(before.values()), "after": sum(after.values()), "prunable": prunable,
                     "requested": asked, "removed": sum(before.values()) - sum(after.values())},
        "layers": {n: [before[n], after[n]] for n in before},
        "params": {"before": count_params(dense), "after": count_params(pruned)},
        "macs": {"before": count_macs(dense, shape), "after": count_macs(pruned, shape)},
        "test_acc": {k: r.top1 for k, r in results.items()},
        "test_top5": {k: r.top5 for k, r in results.items()},
        "max_output_diff_pruned_vs_masked": out_diff,
        "folds": plan.folds, "selects": plan.selects,
        "throughput": latency_table(dense, pruned, shape, options.latency_batches, device),
        "training_throughput": (training_table(dense, pruned, shape, spec.num_classes, data.batch_size, device)
                                if options.latency_batches else None),
        "device": str(device),
    }
    save_checkpoint(save / "pruned.pth", "pruned", spec, pruned, plan, ratio=ratio, epoch=ckpt.get("epoch"),
                    dataset=dataset.info.name, input_shape=shape, test_acc=report["test_acc"]["pruned"])
    write_summary(save, report)
    p, m, c, a = report["params"], report["macs"], report["channels"], report["test_acc"]
    reporter.line(f"pruned {cfg.model} at p={ratio:g} of {prunable} prunable BN channels: asked {asked}, removed "
                  f"{c['removed']} (coupled channels stay when any member keeps them"
                  + (f"; --round-to {options.round_to} keeps multiples of {options.round_to}" if options.round_to > 1 else "")
                  + f"), channels {c['before']} -> {c['after']}")
    reporter.line(f"  params {p['before']:,} -> {p['after']:,} ({p['before'] / p['after']:.2f}x less), "
                  f"MACs {m['before'] / 1e6:.2f}M -> {m['after'] / 1e6:.2f}M ({m['before'] / m['after']:.2f}x less)")
    for b, row in report["throughput"].items():
        reporter.line(f"  inference on {device}, batch {b}: dense {row['dense']:.0f} img/s, pruned {row['pruned']:.0f} "
                      f"img/s ({row['speedup']:.2f}x)")
    train = report["training_throughput"]
    if train:
        d, q = train["dense"], train["pruned"]
        reporter.line(f"  training on {device}, batch {train['batch']}: dense {d['images_per_s']:.0f} img/s ({d['format']}), "
                      f"pruned {q['images_per_s']:.0f} img/s ({q['format']}): {train['speedup']:.2f}x for "
                      f"{m['before'] / m['after']:.2f}x fewer MACs")
    reporter.line(f"  test accuracy: dense {a['dense']:.2f}%  masked {a['masked']:.2f}%  pruned {a['pruned']:.2f}%  "
                  f"(max |pruned - masked| output {out_diff:.1e}) -> {save / 'pruned.pth'}")
    return report


# ----------------------------------------------------------------------------- import

def import_reference_checkpoint(cfg: ImportConfig, model_cfg: ModelConfig, rt: RuntimeConfig, reporter: Reporter,
                                warn) -> Path:
    """Convert a reference-implementation checkpoint (full unpickling, after ``warn``) to earlybird's format."""
    if not cfg.model:
        raise ConfigError("--model is required: pass the reference checkpoint (.pth.tar) to convert")
    spec = model_spec(model_cfg, dataset_info(cfg.dataset))
    out = Path(rt.save) if rt.save else Path(cfg.model).with_name(Path(cfg.model).name.split(".")[0] + ".earlybird.pth")
    if out.exists() and not rt.force:
        raise RunDirError(f"{out} exists: choose another --save or pass --force to overwrite it")
    warn(f"warning: unpickling {cfg.model} in full: a pickle can run code, so import only files you trust")
    obj = read_reference(cfg.model)
    model, plan = import_reference(obj, spec, str(cfg.model))
    shape = [spec.in_channels, spec.image_size, spec.image_size]
    save_checkpoint(out, "imported", spec, model, plan, source=str(cfg.model), epoch=obj.get("epoch"),
                    test_acc=obj.get("best_prec1"), dataset=cfg.dataset, input_shape=shape)
    reporter.line(f"imported {cfg.model} as {'a pruned' if plan else 'a dense'} {spec.describe()} "
                  f"({count_params(model):,} params, epoch {obj.get('epoch')}) -> {out}")
    return out


# ----------------------------------------------------------------------------- eval

def evaluate_checkpoint(cfg: EvalConfig, data: DataConfig, rt: RuntimeConfig, reporter: Reporter,
                        check: ModelCheck | None = None) -> dict:
    """Top-1/top-5, parameters and MACs of any earlybird checkpoint on its dataset's test split."""
    if not cfg.model:
        raise ConfigError("--model is required: pass any checkpoint earlybird wrote (EB-*.pth, pruned.pth, model_best.pth)")
    device = setup_runtime(rt)
    ckpt = load_checkpoint(cfg.model)
    model, spec, plan = model_from_checkpoint(ckpt, cfg.model)
    check_expected(check, spec, cfg.model)
    channels_last = rt.channels_last == "on"  # evaluation is too short to pay for timing both formats
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    dataset = load_dataset(checkpoint_dataset(ckpt, data, cfg.model), data.data, data.download)
    if (dataset.info.in_channels, dataset.info.num_classes) != (spec.in_channels, spec.num_classes):
        raise CheckpointError(f"{cfg.model} has {spec.num_classes} classes and {spec.in_channels} input channels, the "
                              f"data in {data.data} {dataset.info.num_classes} and {dataset.info.in_channels}: "
                              "pass the --data it was trained on")
    _, test = make_loaders(dataset, data, device, rt.seed, channels_last)
    result = evaluate(model, test)
    shape = ckpt.get("input_shape", [spec.in_channels, spec.image_size, spec.image_size])
    summary = {"model": str(cfg.model), "kind": ckpt["kind"], "dataset": dataset.info.name, "pruned": plan is not None,
               "test_images": test.num_samples, "top1": result.top1, "top5": result.top5, "loss": result.loss,
               "params": count_params(model), "macs": count_macs(model, shape)}
    reporter.line(f"{cfg.model} ({ckpt['kind']}{', pruned' if plan else ''} {spec.describe()}) on {dataset.info.name} "
                  f"test ({summary['test_images']:,} images): top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
                  f"loss {result.loss:.4f}  {summary['params']:,} params  {summary['macs'] / 1e6:.2f} M MACs")
    reporter.line(json.dumps(summary))
    return summary


# ----------------------------------------------------------------------------- retrain

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
    model = for_workers(model.to(device), rt, device)
    channels_last = choose_memory_format(rt, model, spec, data.batch_size, device, reporter)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = make_precision(lowp, optim, rt, model, device, spec)
    # A fresh optimizer: the ticket's momentum buffers have the dense shapes, so momentum restarts.
    optimizer = precision.optimizer(make_optimizer(model, optim))
    best = {"test_acc": -1.0, "epoch": None}
    progress = {"test_acc": None}
    scaler_state = None
    if resume_path:
        state = load_checkpoint(resume_path, ("retrain",))
        if state["plan"] != plan.to_dict():
            raise CheckpointError(f"{resume_path} belongs to another pruned network than {cfg.model}: resume with its --model")
        load_weights(model, state["state_dict"], resume_path)
        optimizer.load_state_dict(state["optimizer"])
        precision.load_state_dict(state.get("precision") or {})
        start, best, scaler_state = state["epoch"], state["best"], state.get("scaler")
        progress["test_acc"] = state["test_acc"]
        torch.set_rng_state(state["rng"])
        reporter.line(f"resuming retrain from {resume_path} after epoch {start}")
    dataset = dataset or load_dataset(checkpoint_dataset(ckpt, data, cfg.model), data.data, data.download, data.train_subset,
                                      rt.seed)
    train, test = make_loaders(dataset, data, device, rt.seed, channels_last)
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
                        scaler=scaler.state_dict() if scaler else None, precision=precision.state_dict(), **meta)
        if "swa_test_acc" in record:
            save_checkpoint(save / "swa.pth", "swa", spec, precision.swa.model, plan, epoch=epoch,
                            test_acc=record["swa_test_acc"], **meta)
            progress["swa_test_acc"] = record["swa_test_acc"]
        progress["test_acc"] = record["test_acc"]
        return False, ""

    t0 = time.perf_counter()
    train_seconds = _fit(model, optimizer, train, test, optim, rt, device, start, reporter, log, "retrain", on_epoch_end,
                         precision, scaler_state)
    summary = {
        "stage": "retrain", "source": str(cfg.model), "ratio": ckpt.get("ratio"), "reinit": cfg.reinit,
        "start_epoch": first_epoch, "epochs": optim.epochs, "epochs_trained": optim.epochs - first_epoch,
        "final_test_acc": progress["test_acc"], "best_test_acc": best["test_acc"], "best_epoch": best["epoch"],
        "swa_test_acc": progress.get("swa_test_acc"), "number_formats": precision.lp.describe(),
        "params": count_params(model), "macs": macs, "train_images": train.num_samples,
        "wall_s": round(time.perf_counter() - t0, 1), "train_s": round(train_seconds, 1),
        "memory_format": _format_name(channels_last),
    }
    write_summary(save, summary)
    reporter.line(f"retrain done: final {summary['final_test_acc']:.2f}%, best {best['test_acc']:.2f}% "
                  f"(epoch {best['epoch']}) -> {save / BEST}")
    return summary


# ----------------------------------------------------------------------------- the whole pipeline

def _stage_runtime(rt: RuntimeConfig, stage_dir: Path) -> RuntimeConfig | None:
    """Runtime of one stage of `earlybird run`; None when --resume finds the stage already done."""
    if rt.resume is None:
        return replace(rt, resume=None)
    if (stage_dir / SUMMARY).exists():
        return None
    return replace(rt, resume="" if (stage_dir / LAST).exists() else None, force=False)


def _done(stage_dir: Path) -> dict:
    return json.loads((stage_dir / SUMMARY).read_text())


def run_pipeline(data: DataConfig, model_cfg: ModelConfig, optim: OptimConfig, detect: DetectConfig,
                 options: PruneOptions, rt: RuntimeConfig, reinit: bool, reporter: Reporter,
                 lowp: LowPrecisionConfig | None = None, baseline: bool = False) -> dict:
    """Search until the tickets, prune each, retrain each, and account for the compute spent."""
    validate(data, optim, detect)
    lowp = lowp or LowPrecisionConfig()
    validate_lowp(lowp, optim)
    validate_prune(options)
    data = replace(data, dataset=data.dataset or DEFAULT_DATASET)
    save = Path(rt.save or default_save(data, model_cfg))
    if rt.resume is None and not rt.force:
        if (save / SUMMARY).exists():
            raise RunDirError(f"{save} holds a finished run: choose another --save or pass --force to overwrite it")
        if (save / "search").exists():
            reporter.line(f"{save} holds an unfinished run: continuing it (pass --force to start over)")
            rt = replace(rt, resume="")
    if rt.force and (save / SUMMARY).exists() and distributed.is_main():
        (save / SUMMARY).unlink()
    t0 = time.perf_counter()
    setup_runtime(rt)
    create_model(model_spec(model_cfg, dataset_info(data.dataset, data.data)))  # fail on a bad model before loading data
    dataset = load_dataset(data.dataset, data.data, data.download, data.train_subset, rt.seed)

    stage_rt = _stage_runtime(rt, save / "search")
    found = _done(save / "search") if stage_rt is None else search(
        data, model_cfg, optim, detect, stage_rt, reporter, dataset, save / "search", lowp)
    images = found["train_images"]
    dense_epoch = training_macs(found["macs"], images, 1)
    rows = []
    for r in found["ratios"]:
        ticket = found["tickets"].get(str(r))
        if ticket is None:
            rows.append({"ratio": r, "eb_epoch": None})
            continue
        tag = f"{round(r * 100)}"
        prune_dir, retrain_dir = save / f"pruned-{tag}", save / f"retrain-{tag}"
        reporter.line(f"--- p={r:g}: prune the ticket of epoch {ticket['epoch']}, then retrain")
        if _stage_runtime(rt, prune_dir) is None:
            pr = _done(prune_dir)
        else:
            pr = prune(PruneConfig(str(save / "search" / ticket["path"]), None, detect.min_channels), options,
                       prune_dir, data, replace(rt, resume=None, force=True), reporter, dataset)
        stage_rt = _stage_runtime(rt, retrain_dir)
        rt_cfg = RetrainConfig(model=str(prune_dir / "pruned.pth"), reinit=reinit)
        rr = _done(retrain_dir) if stage_rt is None else retrain(rt_cfg, data, optim, stage_rt, reporter, dataset,
                                                                 retrain_dir, lowp)
        pruned_epoch = training_macs(pr["macs"]["after"], images, 1)
        eb_compute = ticket["epoch"] * dense_epoch + rr["epochs_trained"] * pruned_epoch
        standard = optim.epochs * dense_epoch + optim.epochs * pruned_epoch
        rows.append({
            "ratio": r, "eb_epoch": ticket["epoch"], "eb_fraction": round(ticket["epoch"] / optim.epochs, 4),
            "acc_dense_at_ticket": pr["test_acc"]["dense"], "acc_masked": pr["test_acc"]["masked"],
            "acc_pruned": pr["test_acc"]["pruned"], "acc_retrained": rr["final_test_acc"],
            "acc_retrained_best": rr["best_test_acc"], "acc_retrained_swa": rr.get("swa_test_acc"),
            "params": pr["params"], "macs": pr["macs"],
            "train_speedup_measured": (pr.get("training_throughput") or {}).get("speedup"),
            "retrain_epochs": rr["epochs_trained"], "reinit": rr["reinit"],
            "train_macs": {"eb": eb_compute, "train_prune_retrain": standard, "dense_only": optim.epochs * dense_epoch},
            "compute_vs_train_prune_retrain": round(eb_compute / standard, 4),
            "compute_vs_dense_only": round(eb_compute / (optim.epochs * dense_epoch), 4),
            "retrain_wall_s": rr["wall_s"], "retrain_train_s": rr["train_s"],
        })
    spent = found["epochs_trained"] * dense_epoch + sum(
        row["retrain_epochs"] * training_macs(row["macs"]["after"], images, 1) for row in rows if row["eb_epoch"])
    train_s = found["train_s"] + sum(row["retrain_train_s"] for row in rows if row["eb_epoch"])
    summary = {
        "dataset": data.dataset, "spec": found["spec"], "schedule_epochs": optim.epochs,
        "search_epochs": found["epochs_trained"], "search_final_test_acc": found["final_test_acc"],
        "dense_params": found["params"], "dense_macs": found["macs"], "ratios": rows,
        "total_train_macs": spent, "search_wall_s": found["wall_s"], "wall_s": round(time.perf_counter() - t0, 1),
        "train_s": round(train_s, 1),
        "compute_note": "training MACs = 3 x forward MACs x images x epochs; evaluation not counted",
        "number_formats": found.get("number_formats"),
        "arithmetic_cost_vs_fp32": round(low_precision(lowp).relative_arithmetic_cost(), 4),
    }
    if baseline:
        summary["baseline"] = _baseline(save, data, model_cfg, optim, detect, options, rt, reporter, dataset, lowp,
                                        found)
    write_summary(save, summary)
    table = summary_table(summary)
    if distributed.is_main():
        (save / "summary.txt").write_text(table + "\n")
    reporter.line(table)
    return summary


def _baseline(save: Path, data, model_cfg, optim, detect, options, rt, reporter, dataset, lowp, found) -> dict:
    """Train-prune-retrain, measured: dense training over the whole schedule, each ratio pruned at
    the end and fine-tuned over the whole schedule again (network slimming), same seed. The dense
    training continues the EB search's checkpoint: with the same seed its first epochs are the same
    computation, so their time is the search's."""
    base = save / "baseline"
    search_dir = base / "search"
    if (search_dir / SUMMARY).exists():
        dense = _done(search_dir)
    else:
        if not (search_dir / LAST).exists() and distributed.is_main():
            search_dir.mkdir(parents=True, exist_ok=True)
            for name in (LAST, "metrics.jsonl"):
                shutil.copy2(save / "search" / name, search_dir / name)
        distributed.barrier()
        reporter.line(f"--- baseline: dense training continues to epoch {optim.epochs}, then prune and fine-tune")
        dense = search(data, model_cfg, optim, replace(detect, full=True), replace(rt, resume="", force=False),
                       reporter, dataset, search_dir, lowp)
    dense_epoch = training_macs(dense["macs"], dense["train_images"], 1)
    out = {"dense_final_test_acc": dense["final_test_acc"], "ratios": {},
           "train_s": found["train_s"] + dense["train_s"], "train_macs": optim.epochs * dense_epoch}
    for r in found["ratios"]:
        tag = round(r * 100)
        prune_dir, retrain_dir = base / f"pruned-{tag}", base / f"retrain-{tag}"
        pr = _done(prune_dir) if (prune_dir / SUMMARY).exists() else prune(
            PruneConfig(str(search_dir / LAST), r, detect.min_channels), options, prune_dir, data,
            replace(rt, resume=None, force=True), reporter, dataset)
        stage_rt = _stage_runtime(replace(rt, resume=""), retrain_dir)
        rr = _done(retrain_dir) if stage_rt is None else retrain(
            RetrainConfig(model=str(prune_dir / "pruned.pth"), start_epoch=0), data, optim, stage_rt, reporter,
            dataset, retrain_dir, lowp)
        out["ratios"][str(r)] = {"final": rr["final_test_acc"], "best": rr["best_test_acc"],
                                 "params": pr["params"]["after"], "macs": pr["macs"]["after"]}
        out["train_s"] += rr["train_s"]
        out["train_macs"] += rr["epochs_trained"] * training_macs(pr["macs"]["after"], dense["train_images"], 1)
    out["train_s"] = round(out["train_s"], 1)
    return out


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


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
            lines.append(f"{row['ratio']:>10g}  no ticket within the search")
            continue
        p, m = row["params"], row["macs"]
        cells = [f"{row['ratio']:g}", f"{row['eb_epoch']}/{n}", f"{row['acc_masked']:.2f}%", f"{row['acc_pruned']:.2f}%",
                 f"{row['acc_retrained']:.2f}%", f"{row['acc_retrained_best']:.2f}%", f"{p['before'] / p['after']:.2f}x less",
                 f"{m['before'] / m['after']:.2f}x less", _times(row.get("train_speedup_measured")),
                 f"{row['compute_vs_train_prune_retrain']:.2f}",
                 f"{row['compute_vs_dense_only']:.2f}"]
        lines.append("  ".join(f"{c:>10}" for c in cells))
    lines.append("train speed = measured training images/s of the pruned network over the dense one's (at prune time); "
                 "compute = training MACs of EB Train (EB epochs dense + retrain epochs pruned) divided by "
                 "train-prune-retrain (TPR: full schedule dense + full schedule pruned) and by dense-only training")
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
            f"p={r['ratio']:g} {r['acc_retrained_swa']:.2f}%" for r in swa))
    return "\n".join(lines)
