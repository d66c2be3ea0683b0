"""One training epoch and one evaluation pass; the loop every stage (search, retrain) shares."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OptimConfig
from ..errors import TrainingError
from ..sparsity import add_bn_l1_grad, add_gate_l1_grad
from .distributed import all_reduce_sum


def lr_at(optim: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of the schedule's ``step``-th optimizer step (0-based, counted over every
    epoch): the linear warm-up, then the step schedule (x gamma at every milestone the step's epoch
    has reached) or the cosine from --lr to 0 at the end of the schedule. A function of the step alone,
    so that a resumed run continues it exactly."""
    epochs = step / steps_per_epoch
    warm = optim.warmup_epochs * steps_per_epoch
    if step < warm:  # the step's end, so that the first step moves
        return optim.lr * min(1.0, (step + 1) / warm)
    if optim.lr_schedule == "cosine":
        done = (epochs - optim.warmup_epochs) / (optim.epochs - optim.warmup_epochs)
        return 0.5 * optim.lr * (1 + math.cos(math.pi * min(done, 1.0)))
    return optim.lr * optim.gamma ** sum(1 for m in optim.schedule if epochs >= m)


@dataclass
class EpochResult:
    loss: float
    accuracy: float  # percent
    seconds: float
    images_per_second: float


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _step(model, x, y, optimizer, l1: float, gate_l1: float, scaler, amp_dtype, smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: (loss, correct predictions), both still on the device."""
    with _autocast(x.device, amp_dtype):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if l1:
        add_bn_l1_grad(model, l1)
    if gate_l1:
        add_gate_l1_grad(model, gate_l1)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss, (logits.argmax(1) == y).sum()


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    *,
    l1: float = 0.0,
    gate_l1: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    on_batch: Callable[[int, float, float, float], None] | None = None,
    on_step: Callable[[int], bool] | None = None,
    first: int = 0,
    label_smoothing: float = 0.0,
) -> EpochResult:
    """Train one epoch. ``l1`` > 0 adds the BN-scale subgradient after unscaling, before the step;
    ``gate_l1`` > 0 the gates' (heads and neurons).

    ``on_step(batches done)`` runs after every step and ends the epoch there by returning True;
    ``first``: the batches of the epoch trained before (a loader resumed inside it skips them).

    Under loss scaling (``scaler``, fp16) a step whose loss overflowed is skipped by the scaler,
    which then lowers the scale: such steps count in neither the loss nor the accuracy, and the
    epoch fails as diverged only when over half of its samples had no finite loss (after real
    divergence every loss is NaN). Without a scaler any non-finite loss fails it.
    """
    model.train()
    device = next(model.parameters()).device
    # per-step sums stay on the device: a .item() a step would make the CPU wait for a GPU
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    counted = torch.zeros((), device=device, dtype=torch.long)  # samples of steps with a finite loss
    seen = 0
    steps = len(loader)  # once: a folder loader's length is not free
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader, first):
        loss, hits = _step(model, x, y, optimizer, l1, gate_l1, scaler, amp_dtype, label_smoothing)
        if scaler is None:
            total_loss += loss.detach() * len(y)
            correct += hits
            counted += len(y)
        else:  # the scaler skipped the step if its loss overflowed: it counts nowhere
            taken = torch.isfinite(loss.detach())
            total_loss += torch.where(taken, loss.detach() * len(y), 0.0)
            correct += hits * taken
            counted += taken * len(y)
        seen += len(y)
        if on_batch is not None and ((i + 1) % 10 == 0 or i + 1 == steps):  # .item() syncs a GPU
            elapsed = time.perf_counter() - start
            on_batch(i + 1, loss.item(), 100.0 * correct.item() / max(counted.item(), 1), seen / max(elapsed, 1e-9))
        if on_step is not None and on_step(i + 1):
            break
    sums = torch.stack([total_loss, correct.to(total_loss), counted.to(total_loss), torch.tensor(float(seen), device=device)])
    loss_sum, hits, counted, seen = all_reduce_sum(sums).tolist()
    if not math.isfinite(loss_sum) or counted * 2 < seen:
        skipped = f" in {1 - counted / seen:.0%} of the epoch's samples" if scaler is not None else ""
        raise TrainingError(f"training diverged: the loss was NaN or infinite{skipped}: lower --lr or --s")
    elapsed = time.perf_counter() - start
    return EpochResult(loss_sum / counted, 100.0 * hits / counted, elapsed, seen / elapsed)


@dataclass
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent (100 when there are at most 5 classes)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, amp_dtype: torch.dtype | None = None) -> EvalResult:
    """Mean loss, top-1 and top-5 accuracy (percent) over every sample of ``loader`` (of every worker's part)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros(2, device=device, dtype=torch.long)
    seen = 0
    for x, y in loader:
        with _autocast(device, amp_dtype):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
        seen += len(y)
    loss_sum, hits1, hits5, seen = all_reduce_sum(torch.cat([total_loss.view(1), correct.to(total_loss), torch.tensor(
        [float(seen)], device=device)])).tolist()
    return EvalResult(loss_sum / seen, 100.0 * hits1 / seen, 100.0 * hits5 / seen)
