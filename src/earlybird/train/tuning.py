"""Per-device speed settings, chosen by measurement rather than assumed.

Two things decide much of a CPU run's speed and neither is the same everywhere:

- The allocator. glibc serves each large tensor (an activation of a CIFAR batch is tens of MB) with
  a fresh ``mmap`` and returns it on free, so every step page-faults its activations in again.
  Keeping freed memory in the process (``keep_freed_memory``) made VGG training 1.1-1.4x faster on
  a 2-core CPU (benchmarks/README.md).
- The memory format. channels-last convolutions are faster on most hardware, but CPU batch norm in
  channels-last is several times slower when a layer's width is not a multiple of the vector width,
  which is what pruning leaves. ``faster_memory_format`` times both formats on the model itself.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed

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


def channels_last_hazards(model: nn.Module) -> list[str]:
    """Convolutions that channels-last breaks on CPUs: oneDNN's 1x1 strided weight gradient overruns
    its workspace when a layer has fewer input channels than its block of 16 (oneDNN issue 6035:
    a crash, or silently wrong gradients on some machines). Narrow and pruned ResNets have them."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels // m.groups < 16]


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


def format_timings(model: nn.Module, input_shape, num_classes: int, batch_size: int, device,
                   amp_dtype: torch.dtype | None = None, repeats: int = 3, formats=None) -> dict[bool, float]:
    """Median seconds of one forward + backward pass in train mode (after a warm-up), per memory
    format (key: channels-last?), in the given autocast type, on copies of ``model`` (it is left as
    it is). ``formats`` defaults to those safe on ``device``; their steps alternate, so that a slow
    moment of a shared machine falls on all of them alike."""
    device = torch.device(device)
    if formats is None:
        formats = [False] + ([] if device.type == "cpu" and channels_last_hazards(model) else [True])
    x = torch.randn(batch_size, *input_shape, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    probes = {}
    for channels_last in formats:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        probe = copy.deepcopy(model).to(device, memory_format=fmt).train()
        probes[channels_last] = probe, x.contiguous(memory_format=fmt)
    times = {channels_last: [] for channels_last in formats}
    for _ in range(repeats + 1):
        for channels_last, (probe, inputs) in probes.items():
            times[channels_last].append(_timed_step(probe, inputs, y, amp_dtype))
    return {cl: sorted(t[1:])[repeats // 2] for cl, t in times.items()}


def faster_memory_format(model: nn.Module, input_shape, num_classes: int, batch_size: int, device,
                         amp_dtype: torch.dtype | None = None, repeats: int = 3) -> tuple[bool, float]:
    """(use channels-last?, its speed-up over contiguous) for training ``model`` on ``device``.

    Timed at the training batch size: a smaller one can rank the formats the other way (a pruned
    VGG on a CPU: channels-last 1.16x faster at batch 64, 0.77x at 256). The caller rules out
    ``channels_last_hazards``. With several workers, every worker takes the first worker's answer
    so that all run the same code.
    """
    seconds = format_timings(model, input_shape, num_classes, batch_size, device, amp_dtype, repeats, (False, True))
    speedup = seconds[False] / seconds[True]
    agreed = distributed.all_reduce_sum(torch.tensor([speedup if distributed.is_main() else 0.0], device=device))
    speedup = float(agreed.item())
    return speedup > 1.0, speedup
