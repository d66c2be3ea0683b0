"""Typed configuration. Each field carries its CLI flag and help text, so the argparse parser is
generated from these dataclasses (one source of truth) and stages receive typed objects."""
from __future__ import annotations

import argparse
import ast
import os
from dataclasses import MISSING, dataclass, field, fields

from .errors import ConfigError
from .budget import check_budget
from .importance import IMPORTANCES
from .masks import check_ratio
from .rules import RULES


def boolean(text: str) -> bool:
    """'True'/'False' (and yes/no, 1/0) for flags the reference scripts give a value."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {text!r}")


def interval(text: str) -> float | int:
    """--eb-interval: a number with a point is a fraction of an epoch, a whole number is steps."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction of an epoch (0.1) or a number of steps (250), "
                                         f"not {text!r}") from None


def check_interval(value: float | int) -> None:
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ConfigError(f"--eb-interval {value} is outside its range: a fraction of an epoch in (0, 1] such as "
                          f"0.1, or a whole number of steps, at least 1")


def opt(default, help: str, *flags: str, shown: str | None = None, **argparse_kwargs):
    """A dataclass field with its CLI flags (default: --field-name) and argparse options; ``shown``:
    how --help states a default that depends on the machine (the value itself otherwise)."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "flags": flags, "argparse": argparse_kwargs, "shown": shown}, **kw)


def _default_text(meta, flags: tuple, default, kwargs: dict) -> str:
    """' (default: ...)' for --help: the field's own words, the flag in effect of an on/off pair, or
    the value; nothing for a flag that is off unless given, or a default its help states."""
    if meta.get("shown") is not None:
        return f" (default: {meta['shown']})"
    if kwargs.get("action") is argparse.BooleanOptionalAction:
        return f" (default: {flags[0] if default else '--no-' + flags[0][2:]})"
    return "" if default in (None, "", False) or kwargs.get("action") else f" (default: {default})"


@dataclass
class DataConfig:
    dataset: str | None = opt(None, "dataset: cifar10, cifar100, fashion-mnist, imagenet (train/ and val/ class "
                                    "folders of JPEGs in --data, at 224), folder (your own images: train/<class>/ "
                                    "and val/<class>/ in --data, at their own size) or hf:PATH (a Hugging Face "
                                    "dataset saved with save_to_disk, or hf:NAME from its cache); default: "
                                    "fashion-mnist for search and run, the checkpoint's own for prune, retrain and eval")
    data: str | None = opt(None, "directory holding (or receiving) the dataset files (default: data; for prune, "
                                 "retrain and eval: the folder the checkpoint's data was read from)")
    download: bool = opt(True, "download missing dataset files (checksummed)", action=argparse.BooleanOptionalAction)
    train_subset: int | None = opt(None, "train on a seeded random subset of this many images", type=int)
    batch_size: int = opt(256, "training batch size", type=int)
    test_batch_size: int = opt(256, "evaluation batch size", type=int)
    filter: str = opt("none", "frequency filter on every input image: none, lowpass or highpass (Gaussian)",
                      choices=["none", "lowpass", "highpass"])
    sigma: float = opt(1.0, "width of the --filter Gaussian, in frequency bins", type=float)
    sparsify_gt: float | None = opt(None, "zero every pixel at or below this value (0-1 scale) before normalization",
                                    "--sparsify-gt", "--sparsity_gt", "--sparsity-gt", type=float)
    workers: int = opt(min(8, os.cpu_count() or 1), "image-decoding worker processes (ImageNet, your own images)",
                       type=int, shown="the CPU count, at most 8")
    image_size: int | None = opt(None, "your own images (folder, hf:): the side they train at (default: their own "
                                       "where they are small, median shorter side under 160 px; else 224)", type=int)
    val_fraction: float = opt(0.1, "your own images with no val/ folder or test split: the seeded fraction of each "
                                   "class held out for testing", type=float)
    mean: list | None = opt(None, "your own images: per-channel mean on a 0-1 scale (default: measured on a sample)",
                            type=float, nargs="+")
    std: list | None = opt(None, "your own images: per-channel std on a 0-1 scale (with --mean)", type=float, nargs="+")
    cache: str = opt("auto", "your own images: decode them once and hold them in memory (on; kept in a cache file for "
                             "the next run), stream them through the decoding workers (off), or auto: in memory when "
                             "they take at most a quarter of the free memory (the GPU's when training on one)",
                     choices=["auto", "on", "off"])
    image_column: str | None = opt(None, "hf: the image column (default: the first Image feature)")
    label_column: str | None = opt(None, "hf: the label column (default: the first ClassLabel feature)")

    @property
    def root(self) -> str:
        """--data, or its default."""
        return self.data or "data"

    def image_options(self, device="cpu"):
        """How --dataset folder and hf: read the images (``device``: where training runs)."""
        from .data.images import ImageOptions

        return ImageOptions(self.image_size, self.val_fraction, tuple(self.mean) if self.mean else None,
                            tuple(self.std) if self.std else None, self.cache, self.image_column, self.label_column,
                            self.workers, str(device))

    def check_kind(self, name: str) -> None:
        """Options of one kind of dataset given for another (``name``) are an error, not ignored."""
        from .data import is_own

        defaults = {f.name: f.default for f in fields(self)}
        for options, fits, applies in ((("image_column", "label_column"), name.startswith("hf:"), "hf: datasets"),
                                       (("image_size", "val_fraction", "mean", "std", "cache"), is_own(name),
                                        "your own images (--dataset folder or hf:)")):
            given = [o for o in options if getattr(self, o) != defaults[o]]
            if given and not fits:
                raise ConfigError(f"--{given[0].replace('_', '-')} applies to {applies}, not to {name}: drop it")

    def __post_init__(self):
        from .data.transforms import InputTransform

        InputTransform(self.filter, self.sigma, self.sparsify_gt)  # checks --filter, --sigma, --sparsify-gt
        self.image_options()  # checks --image-size, --val-fraction, --mean/--std
        # search and run name their default dataset, so this checks it; prune, retrain and eval check the
        # checkpoint's once it is read
        if self.dataset:
            self.check_kind(self.dataset)
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must not be negative (0: decode in the main process)")
        for flag, value in (("--batch-size", self.batch_size), ("--test-batch-size", self.test_batch_size)):
            if value < 1:
                raise ConfigError(f"{flag} {value} must be at least 1")


@dataclass
class ModelConfig:
    arch: str = opt("vgg", "architecture (see `earlybird models`): vgg, resnet18, resnet50, preresnet, mobilenetv2, "
                           "densenet, module:function for your own model, torchvision:NAME, timm:NAME")
    depth: int = opt(16, "network depth (VGG 11/13/16/19, PreResNet 9n+2, ResNet 18/34/50/101/152, DenseNet 3n+4)",
                     type=int)
    width: float = opt(1.0, "width multiplier for every layer (e.g. 0.25 for a CPU-sized VGG)", type=float)
    model_kwargs: list = opt([], "key=value arguments for the builder of a timm:, torchvision: or module:function "
                                 "model, as timm's train.py takes them (patch_size=4 depth=6 drop_rate=0.1); values "
                                 "are read as Python literals, else as text. Models that take an input size get the "
                                 "data's (timm img_size, torchvision image_size)", nargs="*", metavar="KEY=VALUE")

    def __post_init__(self):
        self.builder_kwargs()  # a malformed item fails before anything runs

    def builder_kwargs(self) -> tuple:
        """--model-kwargs as (name, value) pairs."""
        pairs = []
        for item in self.model_kwargs:
            key, eq, text = item.partition("=")
            if not eq or not key.isidentifier():
                raise ConfigError(f"--model-kwargs {item}: write each as key=value (e.g. patch_size=4)")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a name such as avg
            pairs.append((key, value))
        return tuple(pairs)


@dataclass
class OptimConfig:
    epochs: int = opt(160, "length of the training schedule in epochs", type=int)
    schedule: list | None = opt(None, "epochs at which the learning rate is multiplied by --gamma (default: at 50%% and "
                                      "75%% of --epochs, the reference's 80 120 of 160; none: a constant rate)",
                                type=int, nargs="*")
    gamma: float = opt(0.1, "learning-rate decay factor at each --schedule epoch", type=float)
    lr: float = opt(0.1, "initial learning rate", type=float)
    optimizer: str = opt("sgd", "sgd (the reference's: momentum, weight decay on every parameter) or adamw (decoupled "
                                "weight decay, none on norms, biases, other one-dimensional parameters and what the "
                                "model's no_weight_decay() names)",
                         choices=["sgd", "adamw"])
    lr_schedule: str = opt("step", "step (x --gamma at each --schedule epoch) or cosine (from --lr to 0 at the end of "
                                   "--epochs, set at every step)", choices=["step", "cosine"])
    warmup_epochs: float = opt(0.0, "epochs (a fraction allowed) of linear warm-up to --lr at the start of the "
                                    "schedule, step by step, before either --lr-schedule", type=float)
    label_smoothing: float = opt(0.0, "label smoothing of the training loss (timm's usual: 0.1)", type=float)
    momentum: float = opt(0.9, "SGD momentum", type=float)
    weight_decay: float | None = opt(None, "weight decay: SGD's on every parameter, AdamW's decoupled one on the "
                                           "weights of convolutions and linear layers", "--weight-decay", "--wd",
                                     type=float, shown="1e-4 with sgd, the reference's; 0.05 with adamw, DeiT's")
    sparsity_regularization: bool = opt(True, "L1 on batch-norm scales (network slimming); in retrain too, as the "
                                              "reference's commands keep it (--no-sparsity-regularization: off)",
                                        "--sparsity-regularization", "-sr", action=argparse.BooleanOptionalAction)
    s: float = opt(1e-4, "strength of the L1 sparsity on batch-norm scales", "--s", type=float)
    gate_s: float = opt(1e-4, "strength of the L1 sparsity on the gates of attention heads and MLP neurons "
                              "(EarlyBERT's)", "--gate-sparsity", type=float)

    def __post_init__(self):
        if self.lr_schedule == "cosine" and self.schedule:
            raise ConfigError(f"--schedule {' '.join(map(str, self.schedule))} places the step schedule's decays: "
                              "--lr-schedule cosine decays at every step, leave --schedule out")
        if self.schedule is None:  # milestones inside the schedule only: a 1-epoch run keeps --lr
            self.schedule = sorted({m for m in (self.epochs // 2, self.epochs * 3 // 4) if 0 < m < self.epochs}) \
                if self.lr_schedule == "step" else []
        if self.weight_decay is None:
            self.weight_decay = 0.05 if self.optimizer == "adamw" else 1e-4
        for flag, value in (("--momentum", self.momentum), ("--weight-decay", self.weight_decay)):
            if value < 0:
                raise ConfigError(f"{flag} {value:g} must not be negative")
        if not self.gamma > 0:
            raise ConfigError(f"--gamma {self.gamma:g} must be positive (0.1 divides the rate by 10)")
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs} must be at least 1")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs:g} must be in [0, {self.epochs}) (--epochs "
                              f"{self.epochs})")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing {self.label_smoothing:g} must be in [0, 1) (0.1 is usual)")
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr:g} must be positive")
        if self.s < 0:
            raise ConfigError(f"--s {self.s:g} must not be negative")
        if any(m < 0 or m > self.epochs for m in self.schedule):
            raise ConfigError(f"--schedule {self.schedule} must lie within 0..{self.epochs} (--epochs)")


@dataclass
class StartConfig:
    weights: str | None = opt(None, "start from these weights instead of a random init, for any --arch: a state dict "
                                    "(.pth, .safetensors), a timm or torchvision checkpoint, or an unpruned earlybird "
                                    "checkpoint; the classifier is left new for the dataset's classes, the first "
                                    "conv adapted to its input channels and a ViT's position embeddings to its image "
                                    "size")
    pretrained: bool = opt(False, "timm:NAME and torchvision:NAME: start from the library's pretrained weights, "
                                  "read from its own cache (no download)", action="store_true")

    def __post_init__(self):
        if self.weights and self.pretrained:
            raise ConfigError("--weights and --pretrained both name the starting weights: pass one")

    def source(self, arch: str):
        """The weights file to start from, or None for a random init."""
        from .pretrained import library_weights

        return self.weights or (library_weights(arch) if self.pretrained else None)


@dataclass
class LowPrecisionConfig:
    wl_weight: int | None = opt(None, "bits of the weights (block floating point; 8 in the paper; default fp32)",
                                type=int)
    wl_grad: int | None = opt(None, "bits of the gradients", type=int)
    wl_activate: int | None = opt(None, "bits of the conv/linear outputs in the forward pass", type=int)
    wl_error: int | None = opt(None, "bits of the errors flowing back into them", type=int)
    wl_momentum: int | None = opt(None, "bits of the SGD momentum buffers", type=int)
    rounding: str = opt("stochastic", "rounding of the low-precision values: stochastic or nearest",
                        choices=["stochastic", "nearest"])
    swa: bool = opt(False, "stochastic weight averaging: a full-precision mean of the weights, once per epoch "
                           "(the reference's '--swa True' works too)", "--swa", nargs="?", const=True, type=boolean)
    swa_start: int = opt(0, "epoch after which --swa averages (e.g. 3/4 of --epochs)", "--swa-start", "--swa_start",
                         type=int)

    def __post_init__(self):
        for name in ("wl_weight", "wl_grad", "wl_activate", "wl_error", "wl_momentum"):
            wl = getattr(self, name)
            if wl is not None and not 2 <= wl <= 24:
                raise ConfigError(f"--{name.replace('_', '-')} {wl} must be in 2..24 bits (leave it out for fp32)")

    def check_schedule(self, optim: "OptimConfig") -> None:
        if self.swa and not 0 <= self.swa_start < optim.epochs:
            raise ConfigError(f"--swa-start {self.swa_start} must be in 0..{optim.epochs - 1} (--epochs {optim.epochs})")


@dataclass
class DetectConfig:
    ratios: list = opt([0.3, 0.5, 0.7], "pruning ratios whose tickets are searched for", type=float, nargs="*")
    target_macs: list = opt([], "budgets whose tickets are searched for too, as fractions of the dense network's MACs "
                                "(e.g. 0.5): each epoch the ratio that meets one after coupling and --round-to is "
                                "solved on that epoch's scores", type=float, nargs="*")
    target_params: list = opt([], "the same for the number of parameters", type=float, nargs="*")
    eb_window: int = opt(5, "masks compared by the Early-Bird rule (newest vs the previous window-1)", type=int)
    eb_rule: str = opt("star", "Early-Bird rule: star (the reference code's: the newest mask within --eb-threshold of "
                               "each other in the window) or chain (the paper's wording: each mask within it of the "
                               "one before)", choices=list(RULES))
    importance: str = opt("bn-scale", "what ranks the channels: bn-scale (|gamma|, network slimming) or filter-l2 "
                                      "(the L2 norm of the filters that produce each channel)",
                          choices=list(IMPORTANCES))
    eb_threshold: float = opt(0.1, "largest mask distance that counts as settled between masks one epoch apart; "
                                    "with --eb-interval the bound scales with the training between masks (0.01 "
                                    "at 0.1 epoch): a rate of change, the same at any interval", type=float)
    eb_interval: float | int = opt(1.0, "how often masks are drawn and compared, as Lightning's val_check_interval: a "
                                  "fraction of an epoch (0.1) or a number of steps (250); a ticket found inside an "
                                  "epoch is saved at once and the search stops there", type=interval)
    min_channels: int = opt(1, "channels every layer keeps whatever the ratio (0: no collapse guard)", type=int)
    head_ratio: float | None = opt(None, "fraction of each layer's attention heads that every ticket prunes, apart "
                                         "from the ratio (default: the ticket's ratio)", type=float)
    neuron_ratio: float | None = opt(None, "fraction of the MLP neurons that every ticket prunes, apart from the ratio "
                                           "(default: the ticket's ratio)", type=float)
    keep_streams: bool = opt(False, "never prune residual streams or concatenations (as the reference does for "
                                    "PreResNet); layers that read them still drop channels", action="store_true")
    full: bool = opt(False, "train the whole schedule instead of stopping once every ticket is drawn", action="store_true")

    def __post_init__(self):
        for r in self.ratios:
            check_ratio(r)
        for metric, fractions in (("macs", self.target_macs), ("params", self.target_params)):
            for f in fractions:
                check_budget(metric, f)
        if not (self.ratios or self.target_macs or self.target_params):
            raise ConfigError("no pruning ratios or budgets given: pass e.g. --ratios 0.3 0.5 0.7 or --target-macs 0.5")
        self.kind_ratios()  # a ratio outside (0, 1) fails before anything runs
        if self.min_channels < 0:
            raise ConfigError(f"--min-channels {self.min_channels} must not be negative")
        check_interval(self.eb_interval)

    def kind_ratios(self) -> dict[str, float]:
        """The fixed ratios of heads and neurons (--head-ratio, --neuron-ratio), where given."""
        return {kind: check_ratio(r) for kind, r in (("head", self.head_ratio), ("neuron", self.neuron_ratio))
                if r is not None}

    def check_steps(self, steps_per_epoch: int) -> int:
        """Training steps between two draws of the masks (at least one)."""
        if isinstance(self.eb_interval, int):
            return self.eb_interval
        return max(1, round(self.eb_interval * steps_per_epoch))


@dataclass
class RuntimeConfig:
    save: str | None = opt(None, "output directory (default: runs/<dataset>-<arch><depth> for search and run; "
                                 "next to the input checkpoint for prune and retrain)")
    seed: int = opt(1, "random seed (weights, data order, augmentation)", type=int)
    device: str = opt("auto", "auto (a GPU where CUDA is), cpu, cuda (this process's GPU: LOCAL_RANK under "
                              "torchrun) or cuda:N (one process)")
    amp: str = opt("auto", "mixed precision: auto times a few training steps with and without autocast on this "
                           "device and keeps the faster (bf16 was 1.6x faster than fp32 on a 2-core AVX-512 CPU); "
                           "on a CPU where one probe convolution takes over 3x as long in bf16 (7.9x on an AVX2 "
                           "CPU without bf16 instructions) it keeps fp32 untimed; on (the bare flag) or off fix "
                           "it; --deterministic and the --wl-* formats make auto mean off",
                   nargs="?", const="on", choices=["auto", "on", "off"])
    amp_dtype: str = opt("auto", "autocast type of --amp: auto (bf16 where the device has it, else fp16 with loss "
                                 "scaling), bf16 or fp16", choices=["auto", "bf16", "fp16"])
    compile: bool = opt(False, "torch.compile the training forward/backward (helps on GPUs; ~30 s to compile, no "
                               "gain measured on small CPUs)", action="store_true")
    channels_last: str = opt("auto", "memory format for training: auto times a few steps of the model in both formats "
                                     "on this device and keeps the faster (channels-last convolutions are faster on "
                                     "most hardware, but CPU batch norm is slow in it at the odd widths pruning "
                                     "leaves); on (the bare flag) or off fix it; --deterministic makes auto mean off",
                             nargs="?", const="on", choices=["auto", "on", "off"])
    cpu_kernels: str = opt("on", "on CPUs, earlybird's speed kernels (earlybird.accel): a fused batch norm (+ the ReLU and "
                                 "2x2 max-pool after it; compiled on first use, ~25 s once per machine; 1.5-10x faster "
                                 "than torch's at the widths pruning leaves), convolutions as im2col + GEMM where "
                                 "timing each layer's parts finds that faster (VGG16's last layers took 60%% of its "
                                 "bf16 step), and glibc keeping freed memory for reuse (1.1-1.4x); off: plain PyTorch. "
                                 "No effect on GPUs; --deterministic and --compile leave the GEMM parts out",
                          choices=["on", "off"])
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice)", type=int)
    deterministic: bool = opt(False, "deterministic kernels only (bit-identical reruns and resumes on GPUs too; "
                                     "slower)", action="store_true")
    gpu_ids: str | None = opt(None, "GPUs to use, e.g. 0 or 0,1,2,3: one runs there, several start one DDP worker "
                                    "per GPU (as torchrun does)", "--gpu-ids", "--gpu_ids")
    port: int | None = opt(None, "rendezvous port when --gpu-ids starts several workers (default: a free one)",
                           type=int)
    sync_bn: bool = opt(False, "under torchrun: batch-norm statistics over the whole global batch (as one process "
                               "computes them) instead of each worker's part", action="store_true")
    force: bool = opt(False, "overwrite what the command writes where it exists: a finished run in --save, an "
                             "--out file", action="store_true")
    tensorboard: bool = opt(False, "also write the metrics as TensorBoard scalars (--save/tensorboard/)",
                            action="store_true")
    resume: str | None = opt(None, "continue an interrupted run from this checkpoint (default: --save/checkpoint.pth; running the same command again does it too)",
                             nargs="?", const="")

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads} must be at least 1")
        if self.seed < 0:
            raise ConfigError(f"--seed {self.seed} must not be negative")


def _rewind():
    return opt("ticket", "the weights the pruned network is retrained from: ticket (its weights where the ticket was "
                         "drawn: EB Train) or pretrained (the weights the search started from, --weights or "
                         "--pretrained, pruned to the ticket's channels, trained from epoch 0: EarlyBERT's choice)",
               choices=["ticket", "pretrained"])


def _check_rewind(rewind: str, reinit: bool) -> None:
    if rewind == "pretrained" and reinit:
        raise ConfigError("--rewind pretrained and --reinit both choose the retrain's starting weights: pass one")


@dataclass
class RetrainConfig:
    model: str = opt("", "pruned checkpoint to retrain (pruned.pth from `earlybird prune`)", "--model", "--scratch")
    reinit: bool = opt(False, "re-initialize the pruned network and train from epoch 0 (EB Train re-init)", action="store_true")
    rewind: str = _rewind()
    start_epoch: int | None = opt(None, "first epoch of the retrain schedule (default: the ticket's epoch; 0 with --reinit "
                                        "or --rewind pretrained)", "--start-epoch", "--start_epoch", type=int)

    def __post_init__(self):
        _check_rewind(self.rewind, self.reinit)


@dataclass
class ImportConfig:
    model: str = opt("", "reference checkpoint to convert (e.g. EB-30-35.pth.tar, pruned.pth.tar, model_best.pth.tar)",
                     "--model")
    scratch: str = opt("", "the EVAL scripts' pair, instead of --model: the pruned architecture (pruned.pth.tar, its "
                           "cfg and selections) ...", "--scratch")
    resume: str = opt("", "... and the weights retrained from it (model_best.pth.tar); either alone is read as "
                          "--model", "--resume")
    dataset: str = opt("cifar10", "dataset it was trained on (sets input channels, size and classes; imagenet: "
                                  "the classes of the checkpoint's fc)")
    out: str | None = opt(None, "file to write (default: next to --model, e.g. EB-30-35.earlybird.pth)")


@dataclass
class ReportConfig:
    run: str = opt("", "the --save directory of an `earlybird run` (or of a search)", "run", metavar="RUN_DIR")
    out: str | None = opt(None, "where the figures and report.md go (default: RUN_DIR/report)")


@dataclass
class ModelCheck:
    """--arch/--depth on commands that read the architecture from a checkpoint: checked against it,
    so the reference scripts' commands, which pass them, keep working and stay honest."""

    arch: str | None = opt(None, "expected architecture of --model (checked; the checkpoint names it)")
    depth: int | None = opt(None, "expected depth of --model (checked)", type=int)


@dataclass
class ExportConfig:
    model: str = opt("", "checkpoint to export: dense, ticket, pruned or retrained", "--model")
    format: str = opt("onnx", "onnx (ONNX Runtime), torchscript (torch.jit.load) or pt2 (torch.export.load): each loads "
                              "without earlybird, with a free batch size", choices=["onnx", "torchscript", "pt2"])
    out: str | None = opt(None, "file to write (default: next to --model, e.g. pruned.onnx)")


@dataclass
class EvalConfig:
    model: str = opt("", "checkpoint to evaluate: an EB ticket, a search, pruned or retrain checkpoint", "--model")


@dataclass
class PruneConfig:
    model: str = opt("", "EB ticket (EB-<percent>-<epoch>.pth) or search checkpoint to prune", "--model")
    percent: float | None = opt(None, "pruning ratio in (0, 1) (default: the ticket's own ratio)", "--percent", type=float)
    min_channels: int = opt(1, "channels every layer keeps when --percent recomputes the mask (0: no collapse guard)",
                            type=int)
    target_macs: float | None = opt(None, "prune to this fraction of the dense network's MACs instead of a ratio (e.g. "
                                          "0.5): the ratio that meets it after coupling and --round-to is solved on the "
                                          "ticket's scores", type=float)
    target_params: float | None = opt(None, "the same for the number of parameters", type=float)
    keep_streams: str | None = opt(None, "never prune residual streams or concatenations, as the reference's "
                                         "resprune.py (layers that read them still drop channels): on (the bare "
                                         "flag) or off, overriding what the search recorded (default: the "
                                         "search's choice; off for an imported checkpoint)",
                                   nargs="?", const="on", choices=["on", "off"])

    def __post_init__(self):
        given = [f for f, v in (("--percent", self.percent), ("--target-macs", self.target_macs),
                                ("--target-params", self.target_params)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} both say how much to prune: pass one")
        if self.budget:
            check_budget(*self.budget)

    @property
    def budget(self) -> tuple[str, float] | None:
        """(metric, fraction) where a budget replaces the ratio."""
        if self.target_macs is not None:
            return "macs", self.target_macs
        return ("params", self.target_params) if self.target_params is not None else None


@dataclass
class WidthConfig:
    """The pruned widths: what prune makes, and what search and run solve budget targets for."""

    round_to: int = opt(8, "keep a multiple of this many channels per layer where it can, giving back its largest-|γ| "
                           "pruned channels: odd widths are slow on GPUs and in CPU batch norm (a pruned VGG trained "
                           "1.6x faster on a CPU with 8 than with 1); 1 prunes exactly the ratio's channels; search "
                           "solves --target-macs/--target-params for these widths", type=int)

    def __post_init__(self):
        if self.round_to < 1:
            raise ConfigError(f"--round-to {self.round_to} must be at least 1")


@dataclass
class PruneOptions:
    measure_speed: bool = opt(False, "also time the dense and the pruned network side by side: inference at "
                                     "--latency-batches, training at --batch-size (benchmarks/prune_speedup.py "
                                     "measures more thoroughly)", action="store_true")
    latency_batches: list = opt([1, 32, 128], "batch sizes at which --measure-speed times inference", type=int,
                                nargs="*")

    def __post_init__(self):
        if any(b < 1 for b in self.latency_batches):
            raise ConfigError(f"--latency-batches {self.latency_batches} must be positive")


@dataclass
class PipelineOptions:
    reinit: bool = opt(False, "retrain re-initialized tickets (EB Train re-init) instead of fine-tuning them",
                       action="store_true")
    rewind: str = _rewind()
    baseline: bool = opt(False, "also run train-prune-retrain (dense training over the whole schedule, prune at the "
                                "end, fine-tune) with the same schedule and seed, and compare", action="store_true")

    def __post_init__(self):
        _check_rewind(self.rewind, self.reinit)


LOWP = "low precision (SWALP: block floating point, stochastic rounding, weight averaging)"


def part(cls, title: str | None = None, only: tuple[str, ...] | None = None):
    """A command's field holding one config dataclass; its flags form an argparse group ``title``.
    ``only``: the fields the command uses, the only ones it shows and accepts (the others keep
    their defaults)."""
    return field(default_factory=cls, metadata={"title": title, "only": only})


def shown_fields(command_field) -> list:
    """The fields of a command's config that are its flags."""
    only = command_field.metadata["only"]
    return [f for f in fields(command_field.default_factory) if only is None or f.name in only]


# What the commands that read a checkpoint without training it use of the data and run options
# (the training commands use them all; tests/test_cli_flags.py checks each command reads every flag it shows).
PLACEMENT = ("device", "threads", "deterministic", "gpu_ids", "port")
EVAL_SPEED = ("amp", "amp_dtype", "channels_last")
TEST_DATA = tuple(f.name for f in fields(DataConfig) if f.name not in ("train_subset", "batch_size"))

# One dataclass per command; a field's name is the keyword its function takes (cli.COMMANDS).
@dataclass
class SearchArgs:
    data: DataConfig = part(DataConfig, "data")
    model_cfg: ModelConfig = part(ModelConfig, "model")
    start: StartConfig = part(StartConfig, "starting weights")
    optim: OptimConfig = part(OptimConfig, "optimization")
    detect: DetectConfig = part(DetectConfig, "Early-Bird detection")
    widths: WidthConfig = part(WidthConfig, "pruned widths")
    lowp: LowPrecisionConfig = part(LowPrecisionConfig, LOWP)
    rt: RuntimeConfig = part(RuntimeConfig, "run")


@dataclass
class PruneArgs:
    cfg: PruneConfig = part(PruneConfig, "prune")
    check: ModelCheck = part(ModelCheck, "model check")
    widths: WidthConfig = part(WidthConfig, "pruned widths")
    options: PruneOptions = part(PruneOptions, "speed of the pruned architecture")
    data: DataConfig = part(DataConfig, "data (for test accuracy)", TEST_DATA + ("batch_size",))
    rt: RuntimeConfig = part(RuntimeConfig, "run", ("save", "force", *PLACEMENT, *EVAL_SPEED, "cpu_kernels"))


@dataclass
class RetrainArgs:
    cfg: RetrainConfig = part(RetrainConfig, "retrain")
    check: ModelCheck = part(ModelCheck, "model check")
    data: DataConfig = part(DataConfig, "data")
    optim: OptimConfig = part(OptimConfig, "optimization")
    lowp: LowPrecisionConfig = part(LowPrecisionConfig, LOWP)
    rt: RuntimeConfig = part(RuntimeConfig, "run")


@dataclass
class RunArgs(SearchArgs):
    options: PruneOptions = part(PruneOptions, "speed of the pruned architecture")
    pipeline: PipelineOptions = part(PipelineOptions, "pipeline")


@dataclass
class EvalArgs:
    cfg: EvalConfig = part(EvalConfig, "eval")
    check: ModelCheck = part(ModelCheck, "model check")
    data: DataConfig = part(DataConfig, "data", TEST_DATA)
    rt: RuntimeConfig = part(RuntimeConfig, "run", PLACEMENT + EVAL_SPEED)


@dataclass
class ExportArgs:
    cfg: ExportConfig = part(ExportConfig, "export")
    check: ModelCheck = part(ModelCheck, "model check")
    rt: RuntimeConfig = part(RuntimeConfig, "output", ("force",))


@dataclass
class ImportArgs:
    cfg: ImportConfig = part(ImportConfig, "import")
    model_cfg: ModelConfig = part(ModelConfig, "model")
    rt: RuntimeConfig = part(RuntimeConfig, "output", ("force",))


@dataclass
class ReportArgs:
    report: ReportConfig = part(ReportConfig)


@dataclass
class ModelsArgs:
    """`earlybird models` takes no flags."""


def add_command_args(parser: argparse.ArgumentParser, command_cls) -> None:
    """The flags of every config a command's dataclass holds, one argparse group per config."""
    for f in fields(command_cls):
        add_config_args(parser, shown_fields(f), f.metadata["title"])


def command_from_args(command_cls, ns: argparse.Namespace):
    """The command's dataclass from parsed flags (each config validates itself as it is built)."""
    return command_cls(**{f.name: f.default_factory(**{g.name: getattr(ns, g.name) for g in shown_fields(f)})
                          for f in fields(command_cls)})


def add_config_args(parser: argparse.ArgumentParser, config_fields: list, title: str | None = None) -> None:
    """The flags of these fields of a config, as one argparse group ``title``."""
    group = parser.add_argument_group(title) if title else parser
    for f in config_fields:
        meta = f.metadata
        flags = meta["flags"] or (f"--{f.name.replace('_', '-')}",)
        default = f.default if f.default is not MISSING else f.default_factory()
        kwargs = dict(meta["argparse"])
        help_text = meta["help"] + _default_text(meta, flags, default, kwargs)
        if flags[0].startswith("-"):
            kwargs["dest"] = f.name
        group.add_argument(*flags, default=default, help=help_text, **kwargs)
