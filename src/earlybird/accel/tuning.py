"""Per-device speed settings, chosen by measurement rather than assumed.

Three things decide much of a run's speed and none is the same everywhere:

- The allocator. glibc serves each large tensor (an activation of a CIFAR batch is tens of MB) with
  a fresh ``mmap`` and returns it on free, so every step page-faults its activations in again.
  Keeping freed memory in the process (``keep_freed_memory``) made VGG training 1.1-1.4x faster on
  a 2-core CPU (benchmarks/README.md).
- The memory format. channels-last convolutions are faster on most hardware, but CPU batch norm in
  channels-last is several times slower when a layer's width is not a multiple of the vector width,
  which is what pruning leaves.
- The precision. bf16 autocast was 1.6x faster than fp32 on the 2-core CPU (oneDNN with AVX-512
  bf16) although older builds and CPUs without it are many times slower in it.
``fastest_setting`` times the candidate settings on the model itself; ``autocast_slowdown`` first
times one small convolution in each precision, so that a CPU without bf16 instructions (on an AVX2
CPU a VGG16 step took 9.2x as long in bf16: about a minute at batch 256) does not spend the start
of every run timing a precision that cannot win.

- The convolution algorithm. On CPUs oneDNN computes some convolutions (small images, many
  channels: a VGG's last layers) several times slower than the same arithmetic as one matrix
  product. ``gemm_convolutions`` times each part of each such layer both ways at its own shape.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..probe import probe_forward
from ..train import distributed
from . import conv as gemm

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    Large allocations then come from the heap, and the heap is never trimmed, so the resident
    size stays at the peak of a step. Returns False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def channels_last_hazards(model: nn.Module, device) -> list[str]:
    """Convolutions that channels-last breaks on ``device``: on CPUs, oneDNN's 1x1 strided weight
    gradient overruns its workspace when a layer has fewer input channels than its block of 16
    (oneDNN issue 6035: a crash, or silently wrong gradients on some machines). Narrow and pruned
    ResNets have them. None elsewhere."""
    if torch.device(device).type != "cpu":
        return []
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels // m.groups < 16]


Setting = tuple[bool, "torch.dtype | None"]  # (channels-last?, autocast type or None for fp32)


# bf16 tensor cores came with compute capability 8.0 (A100). torch.cuda.is_bf16_supported() is
# also True on a V100 or T4, where bf16 is emulated and cuDNN runs it far slower than fp16.
BF16_CAPABILITY = (8, 0)


def default_autocast_dtype(device) -> torch.dtype:
    """bf16 on CPUs and on GPUs with bf16 tensor cores, else fp16 (which needs loss scaling)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < BF16_CAPABILITY:
        return torch.float16
    return torch.bfloat16


def describe_gpu(device) -> str:
    """'NVIDIA A100 (compute capability 8.0: bf16 autocast)': what a run says of its GPU first."""
    major, minor = torch.cuda.get_device_capability(device)
    dtype = default_autocast_dtype(device)
    why = "bf16 autocast" if dtype == torch.bfloat16 else "fp16 autocast with loss scaling; bf16 is emulated below 8.0"
    return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}: {why})"


# With its convolutions 3x as long, a step in the autocast type could only win if over 80% of its
# fp32 time were memory-bound work that half-size values at best halve.
AUTOCAST_MAX_SLOWDOWN = 3.0


@functools.lru_cache(maxsize=None)
def autocast_slowdown(device_type: str, dtype: torch.dtype) -> float:
    """How many times as long a probe convolution (3x3, 64 -> 64 channels, 16x16, batch 32,
    channels-last: ~0.3 GFLOP) takes in ``dtype`` as in fp32 on this CPU, median of 3 after a
    warm-up; 1.0 on other devices, where the steps themselves are cheap to time. Once per process;
    with several workers, all take the first's figure, so that all time the same settings."""
    if device_type != "cpu":
        return 1.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    runs = [_timed(lambda x=x.to(t), w=w.to(t): F.conv2d(x, w, padding=1)) for t in (torch.float32, dtype)]
    fp32, other = _medians(runs, 3)
    return distributed.all_reduce_sum(torch.tensor([other / fp32 if distributed.is_main() else 0.0])).item()


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def setting_to_dict(setting: Setting, model: nn.Module | None = None, device=None) -> dict:
    """A setting as plain values, for a checkpoint, with the GEMM parts of ``model``'s convolutions
    in that setting's precision (``gemm_layers``), so that a resumed run computes as it started,
    and the type of the device it was chosen on (a resume elsewhere chooses again)."""
    channels_last, dtype = setting
    d = {"channels_last": channels_last, "autocast": None if dtype is None else str(dtype).removeprefix("torch.")}
    if device is not None:
        d["device"] = torch.device(device).type
    if model is not None:
        d["gemm"] = gemm_layers(model, dtype)
    return d


def setting_from_dict(d: dict) -> Setting:
    return bool(d["channels_last"]), None if d["autocast"] is None else getattr(torch, d["autocast"])


def setting_name(setting: Setting) -> str:
    channels_last, dtype = setting
    return f"{'channels-last' if channels_last else 'contiguous'} {precision_name(dtype)}"


def safe_formats(model: nn.Module, device) -> list[bool]:
    """The memory formats (channels-last?) ``model`` can train in on ``device``."""
    return [False] + ([] if channels_last_hazards(model, device) else [True])


def _timed_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype: torch.dtype | None) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def step_runs(model: nn.Module, input_shape, num_classes: int, batch_size: int, device, settings
              ) -> dict[Setting, Callable[[], float]]:
    """Per setting (memory format, autocast type), a function that runs one forward + backward
    pass in train mode on a copy of ``model`` (it is left as it is) and returns its seconds."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)  # private: the run's random stream stays as its seed made it
    x = torch.randn(batch_size, *input_shape, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    probes = {}
    for channels_last in dict.fromkeys(cl for cl, _ in settings):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        probe = copy.deepcopy(model).to(device, memory_format=fmt).train()
        probes[channels_last] = probe, x.contiguous(memory_format=fmt)
    return {s: (lambda s=s: _timed_step(*probes[s[0]], y, s[1])) for s in dict.fromkeys(settings)}


def step_timings(model: nn.Module, input_shape, num_classes: int, batch_size: int, device, settings,
                 repeats: int = 3) -> dict[Setting, float]:
    """Median seconds of one forward + backward pass in train mode (after a warm-up) per setting,
    on copies of ``model`` (``step_runs``). The settings' steps alternate, so that a slow moment of
    a shared machine falls on all of them alike."""
    return side_by_side([step_runs(model, input_shape, num_classes, batch_size, device, settings)], repeats)[0]


def side_by_side(runs: list[dict], repeats: int = 3) -> list[dict]:
    """Several models' ``step_runs`` timed in one interleaved series (median of ``repeats`` after a
    warm-up each): a dense network and its pruned one compared this way see the same moments of a
    shared machine (timed one after the other, the same dense network measured 1,566 and 1,009
    images/s in two stages of one run)."""
    medians = iter(_medians([fn for r in runs for fn in r.values()], repeats))
    return [{s: next(medians) for s in r} for r in runs]


def _medians(runs, repeats: int) -> list[float]:
    """The median of what each function returns (the seconds it took) over ``repeats`` calls after
    a warm-up call; the functions alternate, so that a slow moment of a shared machine falls on all
    of them alike."""
    times = [[] for _ in runs]
    for _ in range(repeats + 1):
        for fn, t in zip(runs, times):
            t.append(fn())
    return [sorted(t[1:])[repeats // 2] for t in times]


@torch.inference_mode()
def inference_throughput(model: nn.Module, input_shape, batch_size: int, device, min_seconds: float = 0.3,
                         channels_last: bool = False) -> float:
    """Measured inference images/s of ``model`` at ``batch_size`` on ``device`` (eval mode, no autograd,
    after a warm-up)."""
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    model(x)  # warm-up: allocator, cuDNN algorithm choice
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        model(x)
        runs += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and runs >= 3:
            return runs * batch_size / elapsed


def inference_side_by_side(models, input_shape, batch_size: int, device, rounds: int = 3,
                           min_seconds: float = 0.1) -> list[float]:
    """Measured inference images/s of each of ``models``: ``inference_throughput`` of each in turn,
    a warm-up round and ``rounds`` timed ones, and each model's median (``_medians``), so that a
    shared machine's drift falls on all of them alike (timed one after the other, the same dense
    network measured 458 and 290 images/s at batch 1 in two stages of one run)."""
    return _medians([functools.partial(inference_throughput, m, input_shape, batch_size, device, min_seconds)
                     for m in models], rounds)


def _timed(fn):
    """``fn`` as a function that returns the seconds it took (CPU work: no device to wait for)."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def fastest_setting(model: nn.Module, input_shape, num_classes: int, batch_size: int, device, settings,
                    repeats: int = 3) -> tuple[Setting, dict[Setting, float]]:
    """The setting that trains ``model`` fastest on ``device``, timed at the training batch size (a
    smaller one can rank them the other way: a pruned VGG on a CPU trained 1.16x faster in
    channels-last at batch 64 and 0.77x as fast at 256), and the timings. The caller keeps unsafe
    formats out (``safe_formats``). With several workers, every worker takes the first worker's
    choice so that all run the same code."""
    settings = list(settings)
    timings = step_timings(model, input_shape, num_classes, batch_size, device, settings, repeats)
    best = settings.index(min(timings, key=timings.get))
    agreed = distributed.all_reduce_sum(torch.tensor([best if distributed.is_main() else 0], device=device))
    return settings[int(agreed.item())], timings


@dataclass(frozen=True)
class ConvChoice:
    """One convolution's parts (``kernels.conv.PARTS``) by GEMM or not, and the milliseconds its
    forward + backward took with torch's convolution and with the choice."""

    gemm: tuple[bool, bool, bool]
    torch_ms: float
    chosen_ms: float


def gemm_convolutions(model: nn.Module, input_shape, batch_size: int, device, amp_dtype: torch.dtype | None,
                      repeats: int = 3, margin: float = 0.9, max_patch_bytes: int = 512 << 20
                      ) -> dict[str, ConvChoice]:
    """Which parts of which convolutions of ``model`` train faster as GEMM (``kernels.conv``) in
    channels-last on this CPU: each layer that ``gemm_eligible`` accepts, timed part by part at its
    input's shape for ``batch_size`` in the training precision, both ways side by side. A part goes
    to GEMM when it takes under ``margin`` of torch's time. Layers whose patch matrix (k² times the
    input) would exceed ``max_patch_bytes`` stay torch's untimed: GEMM's memory traffic loses there,
    and its transient memory would be large. Returns the layers with at least one GEMM part, by
    name; none on other devices. With several workers, all take the first's choice."""
    if torch.device(device).type != "cpu":
        return {}
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, args[0].shape[1:])
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if gemm.gemm_eligible(m)]
    g = torch.Generator().manual_seed(0)
    probe_forward(model, torch.randn(1, *input_shape, generator=g), hooks)
    dtype = amp_dtype or torch.float32
    modules = dict(model.named_modules())
    timed: dict[tuple, ConvChoice] = {}
    choices = {}
    size = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        conv = modules[name]
        if batch_size * shape.numel() * conv.kernel_size[0] * conv.kernel_size[1] * size > max_patch_bytes:
            continue
        key = (tuple(shape), tuple(conv.weight.shape), conv.padding, conv.dilation)
        if key not in timed:
            cl = torch.channels_last
            x = torch.randn(batch_size, *shape, generator=g).to(dtype).contiguous(memory_format=cl)
            weight = conv.weight.detach().to(dtype).contiguous(memory_format=cl)
            out = F.conv2d(x, weight, None, 1, conv.padding, conv.dilation)
            grad = torch.randn(out.shape, generator=g).to(dtype).contiguous(memory_format=cl)
            runs = gemm.part_runs(x, weight, grad, conv.padding, conv.dilation)
            ms = [1000 * t for t in _medians([_timed(fn) for pair in runs for fn in pair], repeats)]
            use = tuple(ours < margin * theirs for theirs, ours in zip(ms[::2], ms[1::2]))
            timed[key] = _confirmed(conv, x, grad, amp_dtype, use, repeats, margin) if any(use) else \
                ConvChoice(use, sum(ms[::2]), sum(ms[::2]))
        choices[name] = timed[key]
    # every worker must run the same code: the first's choice, as a flat 0/1 vector
    flat = torch.tensor([float(u) for c in choices.values() for u in c.gemm] if distributed.is_main()
                        else [0.0] * (3 * len(choices)))
    agreed = distributed.all_reduce_sum(flat).view(-1, 3).bool().tolist()
    choices = {name: ConvChoice(tuple(a), c.torch_ms, c.chosen_ms) for (name, c), a in zip(choices.items(), agreed)}
    return {name: c for name, c in choices.items() if any(c.gemm)}


def _confirmed(conv: nn.Module, x: torch.Tensor, grad: torch.Tensor, amp_dtype: torch.dtype | None,
               use: tuple[bool, bool, bool], repeats: int, margin: float) -> ConvChoice:
    """``use`` if the whole layer (module, casts and autograd included: they outweigh what GEMM
    saves on a small layer) trains faster with it than with torch's convolution; no GEMM part
    otherwise. The milliseconds are those of the whole layer's forward + backward."""
    plain = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    gemm.keep_gemm(plain, None)  # torch's, whatever choices another precision left on it
    ours = copy.deepcopy(plain)
    gemm.to_gemm(ours, amp_dtype or torch.float32, use)
    x = x.detach().requires_grad_()

    def step(layer):
        def run():
            layer.weight.grad = x.grad = None
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                y = layer(x)
            y.backward(grad)
        return run

    theirs, mine = (1000 * t for t in _medians([_timed(step(plain)), _timed(step(ours))], repeats))
    if mine < margin * theirs:
        return ConvChoice(use, theirs, mine)
    return ConvChoice((False, False, False), theirs, theirs)


def gemm_layers(model: nn.Module, amp_dtype: torch.dtype | None) -> dict[str, list[bool]]:
    """The GEMM parts of each ``GemmConv2d`` of ``model`` in ``amp_dtype`` (None: fp32), by name."""
    dtype = amp_dtype or torch.float32
    return {name: list(m.gemm[dtype]) for name, m in model.named_modules()
            if isinstance(m, gemm.GemmConv2d) and dtype in m.gemm}


def restore_gemm(model: nn.Module, layers: dict[str, list[bool]], amp_dtype: torch.dtype | None) -> int:
    """Make the layers a checkpoint's ``gemm_layers`` names GEMM again (those ``model`` has and
    ``gemm_eligible`` accepts); returns how many."""
    modules = dict(model.named_modules())
    kept = {name: tuple(parts) for name, parts in layers.items()
            if name in modules and gemm.gemm_eligible(modules[name]) and any(parts)}
    _switch(modules, kept, amp_dtype)
    return len(kept)


def use_gemm(model: nn.Module, choices: dict[str, ConvChoice], amp_dtype: torch.dtype | None) -> None:
    """Make the chosen convolutions of ``model`` ``kernels.conv.GemmConv2d`` layers with their
    choices for ``amp_dtype`` (None: fp32), in place."""
    _switch(dict(model.named_modules()), {name: choice.gemm for name, choice in choices.items()}, amp_dtype)


def _switch(modules: dict[str, nn.Module], parts: dict[str, tuple], amp_dtype: torch.dtype | None) -> None:
    for name, on in parts.items():
        gemm.to_gemm(modules[name], amp_dtype or torch.float32, on)
