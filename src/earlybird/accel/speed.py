"""The speed settings of a training stage: memory format and autocast type (timed where
--channels-last and --amp say auto), and on CPUs the fused batch norm and the GEMM convolutions
(--cpu-kernels). ``prepare`` applies them all; ``restore`` takes the kernels out again."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import RuntimeConfig
from ..errors import ConfigError
from ..progress import Reporter
from ..train import distributed
from . import batch_norm as kernels
from . import cache
from .conv import PARTS, keep_gemm
from .tuning import (AUTOCAST_MAX_SLOWDOWN, ConvChoice, Setting, autocast_slowdown, channels_last_hazards,
                     default_autocast_dtype, fastest_setting, gemm_convolutions, inference_side_by_side,
                     keep_freed_memory, precision_name,
                     restore_gemm, setting_from_dict, setting_name, setting_to_dict, side_by_side, step_runs, use_gemm)


@dataclass
class Speed:
    """What ``prepare`` set up for a stage. ``state_dict`` is the checkpoint's one entry for it
    (under "speed"): a resumed run continues in the same settings and GEMM layers."""

    channels_last: bool
    amp_dtype: torch.dtype | None
    device: torch.device
    undo: list = field(default_factory=list)  # the kernels' module swaps, for restore

    @property
    def setting(self) -> Setting:
        return self.channels_last, self.amp_dtype

    def state_dict(self, model: nn.Module) -> dict:
        return setting_to_dict(self.setting, model, self.device)


def prepare(model: nn.Module, input_shape, num_classes: int, batch_size: int, device: torch.device,
            rt: RuntimeConfig, reporter: Reporter, low_precision_active: bool = False,
            resumed: dict | None = None) -> tuple[nn.Module, Speed]:
    """``model`` (already on ``device``) set up to train fastest: the CPU kernels where --cpu-kernels
    allows them, then the memory format and autocast type, timed on steps of ``batch_size`` (one
    worker's batch; ``resumed``: a checkpoint's state_dict)."""
    if rt.cpu_kernels == "on" and device.type == "cpu":
        keep_freed_memory()
    undo: list = []
    use_fused_batch_norm(model, rt, device, reporter, undo)
    # on CPUs the timing takes 20-40 s: a network timed on this machine before takes its choice back
    key = cache.choice_key(model, input_shape, num_classes, batch_size, rt, low_precision_active) if (
        resumed is None and device.type == "cpu" and rt.cpu_kernels == "on" and not rt.deterministic
        and not distributed.world().active) else None
    recalled = cache.recall(key, reporter.line) if key else None
    if recalled is not None:
        channels_last, dtype = recall_speed(model, recalled, rt, device, reporter)
    else:
        channels_last, dtype = choose_speed(rt, model, input_shape, num_classes, batch_size, device, reporter,
                                            low_precision_active, resumed)
        if key:
            cache.remember(key, setting_to_dict((channels_last, dtype), model, device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, Speed(channels_last, dtype, device, undo)


def recall_speed(model: nn.Module, entry: dict, rt: RuntimeConfig, device, reporter: Reporter) -> Setting:
    """The setting (and its GEMM layers, made so in ``model``) chosen for this network on this machine before."""
    setting = setting_from_dict(entry)
    channels_last, dtype = setting
    restored = restore_gemm(model, entry.get("gemm", {}), dtype) if channels_last and gemm_allowed(rt, device) else 0
    gemm = f", {restored} convolutions partly as im2col + GEMM" if restored else ""
    reporter.line(f"training in {setting_name(setting)}{gemm}, as timed for this network on this machine before "
                  f"(remembered in {cache.cache_file()}: delete it to time again)")
    return setting


def restore(model: nn.Module, speed: Speed) -> nn.Module:
    """``model`` as plain PyTorch again: torch's convolutions and batch norms, the folded
    activations and pools back in place (the parameters stay the same objects)."""
    keep_gemm(model, None)
    kernels.unfuse(speed.undo)
    speed.undo.clear()
    return model


def inference_speed(dense, pruned, shape, batch_sizes, device) -> dict:
    """Measured inference images/s of the dense and the pruned network, side by side."""
    rows = {}
    for b in batch_sizes:
        d, p = inference_side_by_side([dense, pruned], shape, b, device)
        rows[str(b)] = {"dense": round(d, 1), "pruned": round(p, 1), "speedup": round(p / d, 3)}
    return rows


def training_speed(dense, pruned, shape, num_classes: int, batch_size: int, device, rt: RuntimeConfig) -> dict:
    """Measured training images/s of the dense and the pruned network at ``batch_size``, each in the
    fastest of the settings --channels-last and --amp leave open (as search and retrain pick them):
    what the retrain gains per image, which fewer MACs only promise."""
    runs = []
    for model in (dense, pruned):
        model = copy.deepcopy(model)  # accelerated for timing only: the pruned network is saved as it is
        use_fused_batch_norm(model, rt, torch.device(device))
        hazards = bool(channels_last_hazards(model, device))
        settings = [s for s in speed_candidates(rt, device, hazards) if not (hazards and s[0])]
        choose_gemm(model, rt, shape, batch_size, torch.device(device), settings)
        runs.append(step_runs(model, shape, num_classes, batch_size, device, settings or [(False, None)]))
    rows = {"batch": batch_size}
    for name, seconds in zip(("dense", "pruned"), side_by_side(runs)):  # interleaved: the same moments for both
        best = min(seconds, key=seconds.get)
        rows[name] = {"images_per_s": round(batch_size / seconds[best], 1), "setting": setting_name(best)}
    rows["speedup"] = round(rows["pruned"]["images_per_s"] / rows["dense"]["images_per_s"], 3)
    return rows


def format_name(channels_last: bool) -> str:
    return "channels-last" if channels_last else "contiguous"


def autocast_dtype(rt: RuntimeConfig, device) -> torch.dtype:
    """The autocast type --amp uses on ``device``: bf16 where it has it, else fp16 (with loss scaling)."""
    if rt.amp_dtype != "auto":
        return torch.bfloat16 if rt.amp_dtype == "bf16" else torch.float16
    return default_autocast_dtype(device)


def speed_candidates(rt: RuntimeConfig, device, hazards: bool, low_precision_active: bool = False,
                     reporter: Reporter | None = None) -> list[Setting]:
    """The (channels-last?, autocast type) settings --channels-last and --amp leave open to timing:
    under --amp auto not the autocast type where a probe convolution finds it over
    ``AUTOCAST_MAX_SLOWDOWN`` times slower than fp32 (``reporter`` says so)."""
    timed = not rt.deterministic  # a timing can come out either way, and each choice rounds differently
    formats = [False, True] if rt.channels_last == "auto" and timed and not hazards else [rt.channels_last == "on"]
    amp = autocast_dtype(rt, device)
    if rt.amp == "auto" and timed and not low_precision_active:
        dtypes = [None, amp]
        kind = torch.device(device).type
        slowdown = autocast_slowdown(kind, amp)
        if slowdown > AUTOCAST_MAX_SLOWDOWN:
            dtypes = [None]
            if reporter is not None:
                reporter.line(f"precision: fp32 ({precision_name(amp)} took {slowdown:.1f}x as long as fp32 for a "
                              f"probe convolution on this {kind.upper()}, so it was not timed; --amp on forces it)")
    else:
        dtypes = [amp if rt.amp == "on" else None]
    return [(channels_last, dtype) for channels_last in formats for dtype in dtypes]


def choose_speed(rt: RuntimeConfig, model, input_shape, num_classes: int, batch_size: int, device, reporter: Reporter,
                 low_precision_active: bool, resumed: dict | None = None) -> Setting:
    """(channels-last?, autocast type or None) for training: as --channels-last and --amp say, or,
    where they say auto, the fastest of the candidates timed on this model and device; a resumed
    run keeps what it started with (``resumed``, from its checkpoint) where they say auto. On CPUs
    the convolutions' GEMM parts are chosen first (``choose_gemm``), and ``model`` keeps those of
    the setting returned."""
    hazards = channels_last_hazards(model, device)
    if rt.channels_last == "on" and hazards:
        raise ConfigError(f"--channels-last on: layer '{hazards[0]}' (a 1x1 strided convolution with under 16 input "
                          "channels) gets wrong gradients or crashes in channels-last on CPUs (oneDNN issue 6035): "
                          "use --channels-last off")
    kept, note = (resumed_setting(resumed, rt, device, hazards) if resumed is not None and "auto" in (
        rt.channels_last, rt.amp) else (None, ""))
    if note:
        reporter.line(note)
    if kept is not None:
        reporter.line(f"training in {setting_name(kept)}, as the run started" if not note else
                      f"training in {setting_name(kept)}")
        settings = [kept]
    else:
        if rt.channels_last == "auto" and not rt.deterministic and hazards:
            reporter.line(f"memory format: contiguous (channels-last would break layer '{hazards[0]}' on this CPU)")
        settings = speed_candidates(rt, device, bool(hazards), low_precision_active, reporter)
    if resumed is not None and "gemm" in resumed and settings == [setting_from_dict(resumed)] \
            and resumed.get("device", device.type) == device.type and gemm_allowed(rt, device):
        # the layers the run started with: a new timing could round the rest of the run differently
        channels_last, dtype = settings[0]
        restored = restore_gemm(model, resumed["gemm"], dtype) if channels_last else 0
        if restored:
            reporter.line(f"convolutions: {restored} layers partly as im2col + GEMM, as the run started")
        return settings[0]
    best, timings, found = fastest_with_gemm(model, rt, input_shape, num_classes, batch_size, device, settings)
    if timings:
        reporter.line(f"training in {setting_name(best)}, the fastest of: " + ", ".join(
            f"{setting_name(s)} {t * 1000:.0f} ms" for s, t in timings.items()) + f" per step of {batch_size} on "
            f"{device} (--channels-last and --amp fix them)")
    if found:
        report_gemm(best, found, batch_size, reporter)
    return best


def resumed_setting(resumed: dict, rt: RuntimeConfig, device, hazards: list[str]) -> tuple[Setting | None, str]:
    """(setting, note): the setting a resumed run continues in, which is the checkpoint's with
    --channels-last and --amp where they are not auto, re-checked here, where the hardware may
    differ: no channels-last for layers it breaks on CPUs, the autocast type this device trains in,
    fp32 on a CPU that runs it over ``AUTOCAST_MAX_SLOWDOWN`` times slower. None where the run was on
    another device type, whose measured setting means nothing here: it is chosen again."""
    device = torch.device(device)
    was = resumed.get("device", device.type)  # older checkpoints do not say
    if was != device.type:
        return None, f"the run started on {was}: choosing the speed settings for {device.type} again"
    channels_last, dtype = setting_from_dict(resumed)
    if rt.channels_last != "auto":
        channels_last = rt.channels_last == "on"
    if rt.amp != "auto":
        dtype = autocast_dtype(rt, device) if rt.amp == "on" else None
    changed = []
    if channels_last and hazards:
        channels_last = False
        changed.append(f"contiguous (channels-last breaks layer '{hazards[0]}' on this CPU)")
    if dtype is not None and rt.amp == "auto":
        if dtype != autocast_dtype(rt, device):
            changed.append(f"{precision_name(autocast_dtype(rt, device))} (this device's autocast type)")
            dtype = autocast_dtype(rt, device)
        slowdown = autocast_slowdown(device.type, dtype)
        if slowdown > AUTOCAST_MAX_SLOWDOWN:
            changed.append(f"fp32 ({precision_name(dtype)} took {slowdown:.1f}x as long as fp32 on this "
                           f"{device.type.upper()})")
            dtype = None
    old = setting_name(setting_from_dict(resumed))
    return (channels_last, dtype), (f"the run started in {old}; it continues in " + ", ".join(changed)
                                    if changed else "")


def gemm_allowed(rt: RuntimeConfig, device) -> bool:
    return rt.cpu_kernels == "on" and not rt.compile and not rt.deterministic and device.type == "cpu"


def choose_gemm(model, rt: RuntimeConfig, input_shape, batch_size: int, device, settings: list[Setting]
                ) -> dict[torch.dtype | None, dict[str, ConvChoice]]:
    """Where --cpu-kernels allows it (CPUs, not --compile or --deterministic), time each eligible
    convolution of ``model`` both ways for each channels-last setting's precision and make the
    faster parts GEMM (``kernels.conv``), so that timing the settings sees them. By precision, the
    layers chosen."""
    if not gemm_allowed(rt, device):
        return {}
    found = {}
    for dtype in dict.fromkeys(dtype for channels_last, dtype in settings if channels_last):
        found[dtype] = gemm_convolutions(model, input_shape, batch_size, device, dtype)
        use_gemm(model, found[dtype], dtype)
    return found


def fastest_with_gemm(model, rt: RuntimeConfig, input_shape, num_classes: int, batch_size: int, device,
                      settings: list[Setting]) -> tuple[Setting, dict[Setting, float], dict]:
    """(setting, its timings, GEMM layers by precision): the GEMM parts chosen first
    (``choose_gemm``), then the fastest of ``settings`` timed with them (a single one untimed:
    no timings); ``model`` keeps the GEMM layers of the setting returned (none in contiguous)."""
    found = choose_gemm(model, rt, input_shape, batch_size, device, settings)
    best, timings = settings[0], {}
    if len(settings) > 1:
        best, timings = fastest_setting(model, input_shape, num_classes, batch_size, device, settings)
    if found:
        channels_last, dtype = best
        keep_gemm(model, (dtype or torch.float32) if channels_last else None)
    return best, timings, found


def report_gemm(best: Setting, found: dict, batch_size: int, reporter: Reporter) -> None:
    """Say which GEMM layers the setting training runs in has (none in contiguous)."""
    channels_last, dtype = best
    chosen = found.get(dtype, {}) if channels_last else {}
    if not chosen:
        if channels_last:
            reporter.line("convolutions: torch's in every layer (timing found no part faster as GEMM)")
        return
    parts = ", ".join(f"{part} {sum(c.gemm[i] for c in chosen.values())}" for i, part in enumerate(PARTS))
    before, after = sum(c.torch_ms for c in chosen.values()), sum(c.chosen_ms for c in chosen.values())
    ms = "{:.1f}" if before < 10 else "{:.0f}"
    reporter.line(f"convolutions: {len(chosen)} layers partly as im2col + GEMM ({parts}), faster at their shapes "
                  f"than torch's: {ms.format(before)} -> {ms.format(after)} ms per step of {batch_size} "
                  "(--cpu-kernels off: torch's)")


def use_fused_batch_norm(model, rt: RuntimeConfig, device, reporter: Reporter | None = None,
                         undo: list | None = None) -> int:
    """Switch ``model``'s batch norms to the fused kernel (in place) where --cpu-kernels and the
    device allow it; the kernel itself serves channels-last steps only, so the timed settings see it
    too. ``undo`` receives what ``restore`` needs to switch them back."""
    if rt.cpu_kernels != "on" or rt.compile or device.type != "cpu":
        return 0
    if kernels.needs_build() and reporter is not None:
        reporter.line("compiling the fused batch-norm kernel for this machine (once, about 25 s)")
    count = kernels.fuse_batch_norm(model, undo=undo)
    if reporter is None:
        return count
    if count:
        fused = [m for m in model.modules() if isinstance(m, kernels.FusedBatchNorm2d)]
        acts, pools = sum(m.activation is not None for m in fused), sum(m.pool for m in fused)
        pooled = f", {pools} with the max-pool after that" if pools else ""
        reporter.line(f"batch norm: {count} layers ({acts} with the activation after them{pooled}) on earlybird's "
                      "fused kernel in channels-last steps (--cpu-kernels off: torch's)")
    elif kernels.failure():
        reporter.line(f"fused batch norm unavailable ({kernels.failure()}): torch's kernel serves (--cpu-kernels off "
                      "silences this)")
    return count


