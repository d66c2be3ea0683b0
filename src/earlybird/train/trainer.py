"""One trainer for every stage: a resumable state and an epoch loop that calls named hooks.

Search is the trainer plus the Early-Bird callback; retrain is the trainer plus the best-checkpoint
callback; SWA, the metrics log (and its TensorBoard scalars) and the checkpoint of the last epoch
are callbacks too. Each callback adds its own entries to the checkpoint (``state_dict``) and takes
them back on resume (``load_state_dict``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import OptimConfig
from ..errors import WriteError
from ..lowp import Precision
from ..progress import Reporter, format_seconds
from . import distributed
from .checkpoint import load_weights
from .loop import evaluate, lr_at, train_epoch


class Callback:
    """Hooks the Trainer calls by name; every one is optional."""

    def on_epoch_end(self, trainer: "Trainer", record: dict) -> str:
        """After the epoch's evaluation: may add to ``record`` (the metrics line), set
        ``trainer.stop``; returns a note for the epoch's progress line."""
        return ""

    def state_dict(self) -> dict:
        """Entries of the checkpoint this callback owns."""
        return {}

    def load_state_dict(self, ckpt: dict) -> None:
        """Take those entries back from a resumed checkpoint."""


class Trainer:
    """Model, optimizer, loss scaler, number formats, RNG and epoch: the state a stage resumes from.

    ``fit`` trains from ``epoch`` to ``optim.epochs`` (or until a callback sets ``stop``) under
    autocast to ``speed.amp_dtype`` (fp16 with loss scaling), with L1 on the BN scales where ``optim``
    asks for it."""

    def __init__(self, model, optimizer, precision: Precision, optim: OptimConfig, device: torch.device, speed,
                 reporter: Reporter, stage: str, compile: bool = False):
        self.model, self.optimizer, self.precision, self.optim = model, optimizer, precision, optim
        self.device, self.reporter, self.stage, self.compile = device, reporter, stage, compile
        self.speed = speed  # accel.Speed: the autocast type, and the checkpoint entry of the speed settings
        self.amp_dtype = speed.amp_dtype
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.callbacks: list[Callback] = []
        self.epoch, self.test_acc, self.stop, self.train_seconds = 0, None, False, 0.0
        self.saved_epoch = None  # the epoch the resumable checkpoint holds (SaveLast keeps it current)

    def state_dict(self) -> dict:
        """Everything but the weights (``save_checkpoint`` takes the model), callbacks' entries included."""
        state = {"epoch": self.epoch, "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "precision": self.precision.state_dict(),
                 "test_acc": self.test_acc, "speed": self.speed.state_dict(self.model)}
        for callback in self.callbacks:
            state.update(callback.state_dict())
        return state

    def load_state_dict(self, ckpt: dict, path: str | Path) -> None:
        load_weights(self.model, ckpt["state_dict"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        note = self.precision.load_state_dict(ckpt.get("precision") or {})
        if note:
            self.reporter.line(note)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.test_acc = ckpt["epoch"], ckpt["test_acc"]
        self.saved_epoch = self.epoch
        torch.set_rng_state(ckpt["rng"])
        for callback in self.callbacks:
            callback.load_state_dict(ckpt)
        self.reporter.line(f"resuming {self.stage} from {path} after epoch {self.epoch}")

    def fit(self, train, test) -> float:
        """Train until the schedule ends or a callback stops it; returns the seconds spent training."""
        net = distributed.wrap(self.model, self.device)  # DDP with several workers; evaluation needs no wrapper
        if self.compile:
            net = torch.compile(net)
        start = self.epoch
        while self.epoch < self.optim.epochs and not self.stop:
            record, seconds = self._epoch(net, train, test)
            note = self._epoch_end(record)
            self.train_seconds += seconds
            left = (self.optim.epochs - self.epoch) * self.train_seconds / (self.epoch - start)
            self.reporter.line(
                f"{self.stage} epoch {self.epoch}/{self.optim.epochs}  lr {record['lr']:.3g}  loss "
                f"{record['train_loss']:.3f}  train {record['train_acc']:.1f}%  test {record['test_acc']:.2f}%  "
                f"{record['images_per_s']:.0f} img/s  {seconds:.0f}s"
                f"{'' if self.stop else f'  ~{format_seconds(left)} left'}{note}")
        return self.train_seconds

    def _epoch_end(self, record: dict) -> str:
        """The callbacks' notes; a file they could not write says where a rerun continues."""
        try:
            return "".join(callback.on_epoch_end(self, record) for callback in self.callbacks)
        except WriteError as exc:
            raise exc.resuming(": it starts over (no epoch was saved yet)" if self.saved_epoch is None else
                               f": it resumes after epoch {self.saved_epoch}") from None

    def _epoch(self, net, train, test) -> tuple[dict, float]:
        """One epoch of training and the evaluation after it: (metrics record, training seconds)."""
        epoch, optim = self.epoch, self.optim
        lr = lr_at(epoch, optim.lr, optim.schedule, optim.gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        train.set_epoch(epoch)
        update, close = self.reporter.epoch_bar(len(train), f"{self.stage} {epoch + 1}/{optim.epochs}")
        try:
            result = train_epoch(net, train, self.optimizer, l1=optim.s if optim.sparsity_regularization else 0.0,
                                 scaler=self.scaler, amp_dtype=self.amp_dtype, on_batch=update)
        finally:
            close()
        tested = evaluate(self.model, test, self.amp_dtype)
        self.epoch, self.test_acc = epoch + 1, tested.top1
        return {"stage": self.stage, "epoch": epoch + 1, "lr": lr, "train_loss": round(result.loss, 5),
                "train_acc": round(result.accuracy, 3), "test_loss": round(tested.loss, 5),
                "test_acc": round(tested.top1, 3), "images_per_s": round(result.images_per_second, 1),
                "epoch_s": round(result.seconds, 2)}, result.seconds
