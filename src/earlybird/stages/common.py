"""What every stage shares: the runtime (device, threads, memory format), save directories,
loaders, optimizer and the epoch loop."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import DataConfig, LowPrecisionConfig, ModelCheck, ModelConfig, OptimConfig, RuntimeConfig
from ..data import (BatchLoader, Dataset, DatasetInfo, FolderDataset, FolderLoader, InputTransform, Survey, is_own,
                    load_dataset, loader_of, survey_dataset)
from ..errors import CheckpointError, ConfigError
from .. import accel
from ..lowp import LowPrecision, Precision
from ..models import ModelSpec, resolve_arch
from ..progress import Reporter
from ..train import distributed
from ..train.callbacks import SWA, Metrics, SaveLast, Saver
from ..train.trainer import Callback, Trainer
from .rundir import RunDir

def resolve_device(name: str) -> torch.device:
    """--device as this process's device. ``cuda`` (and ``auto`` where CUDA is) means this rank's
    GPU: LOCAL_RANK under torchrun, GPU 0 alone. An explicit ``cuda:N`` is for one process only:
    under torchrun it would put every rank on one GPU (NCCL: "duplicate GPU")."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device '{name}' is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    w, count = distributed.world(), torch.cuda.device_count()
    seen = f"{count} GPU(s), numbered 0..{count - 1}" + distributed.mask_note()
    if device.index is None:
        if w.local_rank >= count:
            raise ConfigError(f"--device {name}: this is local process {w.local_rank} of a node with {seen}: start "
                              f"at most {count} processes per node (torchrun --nproc-per-node {count})")
        return torch.device("cuda", w.local_rank)
    if w.active:
        raise ConfigError(f"--device {name}: under torchrun each of the {w.size} processes takes its own GPU "
                          "(LOCAL_RANK): use --device cuda (or auto)")
    if device.index >= count:
        raise ConfigError(f"--device {name}: this machine has {seen}")
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


def survey_data(data: DataConfig, platform: "Platform") -> Survey:
    """What --dataset is before it is read (one's own images: scanned and a sample surveyed)."""
    return survey_dataset(data.dataset or DEFAULT_DATASET, data.root, data.image_options(platform.device))


def load_data(data: DataConfig, platform: "Platform", reporter: Reporter | None = None,
              surveyed: Survey | None = None) -> Dataset | FolderDataset:
    """The dataset --dataset names (read, fetched, or one's own images surveyed and decoded), from
    ``survey_data``'s scan where given."""
    return load_dataset(data.dataset or DEFAULT_DATASET, data.root, data.download, data.train_subset, platform.seed,
                        data.image_options(platform.device), reporter=reporter, surveyed=surveyed)


def checkpoint_data(ckpt: dict, data: DataConfig, path, platform: "Platform", reporter: Reporter | None = None,
                    train_subset: int | None = None) -> Dataset | FolderDataset:
    """The dataset a checkpoint was trained on, from the folder it was read from unless --data says
    otherwise; one's own images read as the checkpoint describes them (classes, size, normalization,
    held-out split)."""
    name = checkpoint_dataset(ckpt, data, path)
    data.check_kind(name)
    saved = DatasetInfo.from_dict(ckpt["data_info"]) if ckpt.get("data_info") else None
    like = saved if is_own(name) else None
    root = data.data or (saved.root if saved is not None and saved.root else data.root)  # a later --data wins
    return load_dataset(name, root, data.download, train_subset, platform.seed, data.image_options(platform.device),
                        like, reporter)


def data_meta(info: DatasetInfo) -> dict:
    """What every checkpoint says of its data: the dataset's name, its input shape and its description."""
    return {"dataset": info.name, "input_shape": [info.in_channels, info.image_size, info.image_size],
            "data_info": info.to_dict()}


@dataclass(frozen=True)
class Platform:
    """Where this process runs, set up once per command by ``setup_runtime``: its device, its place
    among the workers (rank, number, local rank) and the run's seed. The stages read these from
    it, not from --device, --seed or the distributed module."""

    device: torch.device
    world: distributed.World
    seed: int

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    def per_worker(self, batch_size: int) -> int:
        """One worker's part of a global batch."""
        return max(1, batch_size // self.world.size)


def setup_runtime(rt: RuntimeConfig) -> Platform:
    if rt.gpu_ids:  # one id: that GPU; several: this is one of the workers launch_on_gpus started
        ids = distributed.parse_gpu_ids(rt.gpu_ids) if "WORLD_SIZE" not in os.environ else []
        rt = replace(rt, device=f"cuda:{ids[0]}" if len(ids) == 1 else "auto")
    wants_cuda = rt.device.startswith("cuda") or (rt.device == "auto" and torch.cuda.is_available())
    distributed.init_from_env(wants_cuda)
    device = resolve_device(rt.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rt.threads:
        torch.set_num_threads(rt.threads)
    if rt.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    random.seed(rt.seed)
    torch.manual_seed(rt.seed)
    return Platform(device, distributed.world(), rt.seed)


def model_spec(model_cfg: ModelConfig, info: DatasetInfo) -> ModelSpec:
    """The dense network of a run: the model flags plus the dataset's input and class counts."""
    arch, depth = resolve_arch(model_cfg.arch, model_cfg.depth)
    return ModelSpec(arch, depth, model_cfg.width, info.in_channels, info.num_classes, info.image_size,
                     model_cfg.builder_kwargs())


def probe_inputs(spec: ModelSpec, n: int = 4) -> torch.Tensor:
    """Random inputs of the model's shape for tracing its graph (a private generator: the run's
    random stream stays as the seed made it)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, spec.in_channels, spec.image_size, spec.image_size, generator=g)


def default_save(data: DataConfig, model_cfg: ModelConfig) -> Path:
    name = data.dataset or DEFAULT_DATASET
    name = f"hf-{Path(name[3:]).name}" if name.startswith("hf:") else name  # a path or hub name: its last part
    return Path("runs") / f"{name}-{model_cfg.arch}{model_cfg.depth}"


def make_loader(dataset: Dataset | FolderDataset, data: DataConfig, platform: Platform, channels_last: bool,
                train: bool) -> BatchLoader | FolderLoader:
    """This worker's loader of the training or the test split (a uint8 split is copied to ``device``
    whole: build only the ones a command uses)."""
    w, device, seed = platform.world, platform.device, platform.seed
    transform = InputTransform(data.filter, data.sigma, data.sparsify_gt)
    flag, size = ("--batch-size", data.batch_size) if train else ("--test-batch-size", data.test_batch_size)
    if size % w.size:
        raise ConfigError(f"{flag} {size} is the global batch: it must divide among the {w.size} workers")
    return loader_of(dataset, train, size, device, seed, channels_last, data.workers, w.rank, w.size, transform)


def make_loaders(dataset: Dataset | FolderDataset, data: DataConfig, platform: Platform, channels_last: bool):
    """(training loader, test loader)."""
    return tuple(make_loader(dataset, data, platform, channels_last, train) for train in (True, False))


def for_workers(model, rt: RuntimeConfig, platform: Platform):
    """With several workers and --sync-bn, batch statistics over the whole global batch."""
    if rt.sync_bn and platform.world.active:
        return distributed.sync_batchnorm(model, platform.device)
    return model


def low_precision(lowp: LowPrecisionConfig) -> LowPrecision:
    return LowPrecision(lowp.wl_weight, lowp.wl_grad, lowp.wl_activate, lowp.wl_error, lowp.wl_momentum, lowp.rounding)


def make_precision(lowp: LowPrecisionConfig | None, optim: OptimConfig, rt: RuntimeConfig, model, platform: Platform,
                   spec: ModelSpec) -> Precision:
    """Quantizer hooks, optimizer wrapper and SWA of a stage (all off at full precision)."""
    lowp = lowp or LowPrecisionConfig()
    lowp.check_schedule(optim)
    if lowp.wl_momentum is not None and optim.optimizer != "sgd":
        raise ConfigError(f"--wl-momentum quantizes SGD's momentum buffers, which --optimizer {optim.optimizer} does "
                          "not have: leave it out")
    lp = low_precision(lowp)
    if lp.active and rt.amp == "on":
        raise ConfigError("--amp and the --wl-* low-precision formats do not mix: choose one")
    return Precision(lp, model, platform.device, platform.seed, probe_inputs(spec, 2), lowp.swa, lowp.swa_start)


def make_optimizer(model, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD as the reference trains (decay on every parameter), or AdamW with its decoupled decay on the
    weights of convolutions and linear layers only: not on norms, biases or other 1-d parameters, nor
    on those the model's ``no_weight_decay()`` names (timm's: position embeddings, class token)."""
    if optim.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay)
    spared = set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()
    groups = {True: [], False: []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[p.ndim > 1 and name not in spared].append(p)
    return torch.optim.AdamW([{"params": groups[True]}, {"params": groups[False], "weight_decay": 0.0}],
                             lr=optim.lr, weight_decay=optim.weight_decay)


def prepare_training(model, spec: ModelSpec, data: DataConfig, optim: OptimConfig, rt: RuntimeConfig,
                     lowp: LowPrecisionConfig | None, platform: Platform, reporter: Reporter,
                     resumed: dict | None = None):
    """(model, speed, precision, optimizer) of a training stage: the model on its device and
    workers, set up by ``accel.prepare`` (``resumed``: the speed entry of a resumed run's
    checkpoint), with its number formats and a fresh optimizer; ``speed.amp_dtype`` goes to ``fit``."""
    device = platform.device
    if device.type == "cuda":
        reporter.line(f"GPU: {accel.describe_gpu(device)}" + (f"; --amp-dtype {rt.amp_dtype} sets the autocast type"
                                                               if rt.amp_dtype != "auto" else ""))
    model = for_workers(model.to(device), rt, platform)
    lowp = lowp or LowPrecisionConfig()
    model, speed = accel.prepare(model, (spec.in_channels, spec.image_size, spec.image_size), spec.num_classes,
                                 platform.per_worker(data.batch_size), device, rt, reporter, low_precision(lowp).active,
                                 resumed)
    precision = make_precision(lowp, optim, rt, model, platform, spec)
    return model, speed, precision, precision.optimizer(make_optimizer(model, optim))


def make_trainer(model, spec: ModelSpec, data: DataConfig, optim: OptimConfig, rt: RuntimeConfig,
                 lowp: LowPrecisionConfig | None, platform: Platform, reporter: Reporter, stage: str,
                 resumed: dict | None) -> Trainer:
    """A stage's trainer (no callbacks yet): the model prepared for training; ``resumed``: the
    checkpoint the stage continues from, whose speed settings it keeps."""
    model, speed, precision, optimizer = prepare_training(model, spec, data, optim, rt, lowp, platform, reporter,
                                                          resumed.get("speed") if resumed else None)
    return Trainer(model, optimizer, precision, optim, platform.device, speed, reporter, stage, rt.compile)


def with_callbacks(trainer: Trainer, run: RunDir, saver: Saver, kind: str, loaders, rt: RuntimeConfig,
                   *stage_callbacks: Callback) -> Trainer:
    """Every stage's callbacks around its own: SWA first (it adds to the epoch's record), then the
    stage's, then the resumable checkpoint (it holds what they did), then the metrics log (a log that
    cannot be written leaves the epoch saved)."""
    trainer.callbacks = [SWA(saver, run.swa, *loaders), *stage_callbacks, SaveLast(saver, run.last, kind),
                         Metrics(run.metrics, rt.tensorboard)]
    return trainer
