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
from ..errors import ConfigError, WriteError
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

    def on_step(self, trainer: "Trainer", record: dict) -> str:
        """Inside an epoch, every ``trainer.check_every`` steps (not after an epoch's last step: that
        one is the epoch's end): as ``on_epoch_end``, without an evaluation in ``record``."""
        return ""

    def state_dict(self) -> dict:
        """Entries of the checkpoint this callback owns."""
        return {}

    def load_state_dict(self, ckpt: dict) -> None:
        """Take those entries back from a resumed checkpoint."""


class Trainer:
    """Model, optimizer, loss scaler, number formats, RNG and epoch: the state a stage resumes from.

    ``fit`` trains from ``epoch`` to ``optim.epochs`` (or until a callback sets ``stop``, at an
    epoch's end or at a step inside it) under autocast to ``speed.amp_dtype`` (fp16 with loss
    scaling), with L1 on the BN scales where ``optim`` asks for it. ``epoch`` counts whole epochs,
    ``batch`` the steps taken into the next one (not 0 only in a run stopped or saved inside it)."""

    def __init__(self, model, optimizer, precision: Precision, optim: OptimConfig, device: torch.device, speed,
                 reporter: Reporter, stage: str, compile: bool = False):
        self.model, self.optimizer, self.precision, self.optim = model, optimizer, precision, optim
        self.device, self.reporter, self.stage, self.compile = device, reporter, stage, compile
        self.speed = speed  # accel.Speed: the autocast type, and the checkpoint entry of the speed settings
        self.amp_dtype = speed.amp_dtype
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.callbacks: list[Callback] = []
        self.epoch, self.test_acc, self.stop, self.train_seconds = 0, None, False, 0.0
        self.batch, self.steps_per_epoch = 0, 1
        self.check_every = 0  # steps between the callbacks' on_step calls inside an epoch (0: none)
        self.saved_at: str | None = None  # where the resumable checkpoint was saved (SaveLast keeps it current)

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batch

    @property
    def position(self) -> float | int:
        """Epochs trained: whole, or with the fraction of the epoch in progress."""
        return round(self.epoch + self.batch / self.steps_per_epoch, 4) if self.batch else self.epoch

    def where(self) -> str:
        """The point of the schedule reached, in words ("epoch 3", "step 40 of epoch 2")."""
        return f"step {self.batch} of epoch {self.epoch + 1}" if self.batch else f"epoch {self.epoch}"

    def state_dict(self) -> dict:
        """Everything but the weights (``save_checkpoint`` takes the model), callbacks' entries included."""
        state = {"epoch": self.epoch, "batch": self.batch, "optimizer": self.optimizer.state_dict(),
                 "optimizer_kind": self.optim.optimizer,
                 "rng": torch.get_rng_state(),
                 "scaler": self.scaler.state_dict() if self.scaler else None, "precision": self.precision.state_dict(),
                 "test_acc": self.test_acc, "speed": self.speed.state_dict(self.model)}
        for callback in self.callbacks:
            state.update(callback.state_dict())
        return state

    def load_state_dict(self, ckpt: dict, path: str | Path) -> None:
        kind = ckpt.get("optimizer_kind", "sgd")
        if kind != self.optim.optimizer:  # the other optimizer's state would load, then fail at its first step
            raise ConfigError(f"{path} was trained with --optimizer {kind}: resume with it (or --force to start over "
                              f"with --optimizer {self.optim.optimizer})")
        load_weights(self.model, ckpt["state_dict"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        note = self.precision.load_state_dict(ckpt.get("precision") or {})
        if note:
            self.reporter.line(note)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.batch, self.test_acc = ckpt["epoch"], ckpt.get("batch", 0), ckpt["test_acc"]
        torch.set_rng_state(ckpt["rng"])
        for callback in self.callbacks:
            callback.load_state_dict(ckpt)
        self.saved_at = self.where()
        self.reporter.line(f"resuming {self.stage} from {path} after {self.saved_at}")

    def fit(self, train, test) -> float:
        """Train until the schedule ends or a callback stops it; returns the seconds spent training."""
        net = distributed.wrap(self.model, self.device)  # DDP with several workers; evaluation needs no wrapper
        if self.compile:
            net = torch.compile(net)
        self.steps_per_epoch = len(train)
        if self.batch >= self.steps_per_epoch:
            raise ConfigError(f"the checkpoint was saved at step {self.batch} of an epoch, which now has "
                              f"{self.steps_per_epoch}: resume with the original --batch-size and data")
        start = self.position
        while self.epoch < self.optim.epochs and not self.stop:
            record, seconds = self._epoch(net, train, test)
            note = self._callbacks("on_epoch_end", record)
            self.train_seconds += seconds
            left = (self.optim.epochs - self.position) * self.train_seconds / max(self.position - start, 1e-9)
            self.reporter.line(
                f"{self.stage} epoch {self.position}/{self.optim.epochs}  lr {record['lr']:.3g}  loss "
                f"{record['train_loss']:.3f}  train {record['train_acc']:.1f}%  test {record['test_acc']:.2f}%  "
                f"{record['images_per_s']:.0f} img/s  {seconds:.0f}s"
                f"{'' if self.stop else f'  ~{format_seconds(left)} left'}{note}")
        return self.train_seconds

    def _callbacks(self, hook: str, record: dict) -> str:
        """The callbacks' notes; a file they could not write says where a rerun continues."""
        try:
            return "".join(getattr(callback, hook)(self, record) for callback in self.callbacks)
        except WriteError as exc:
            raise exc.resuming(": it starts over (nothing was saved yet)" if self.saved_at is None else
                               f": it resumes after {self.saved_at}") from None

    def _set_lr(self) -> float:
        """The learning rate of the step about to be taken (the schedule moves inside epochs too)."""
        lr = lr_at(self.optim, self.global_step, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _step_end(self, done: int) -> bool:
        """After a step inside an epoch: the next step's learning rate, the callbacks' on_step where
        one is due; True to stop."""
        used = self.optimizer.param_groups[0]["lr"]
        self.batch = done
        self._set_lr()
        if done < self.steps_per_epoch and self.check_every and self.global_step % self.check_every == 0:
            record = {"stage": self.stage, "epoch": self.position, "step": self.global_step, "lr": used}
            note = self._callbacks("on_step", record)
            self.reporter.line(f"{self.stage} epoch {self.position}/{self.optim.epochs}  step {self.global_step}{note}")
        return self.stop

    def _epoch(self, net, train, test) -> tuple[dict, float]:
        """One epoch of training and the evaluation after it: (metrics record, training seconds)."""
        epoch, optim = self.epoch, self.optim
        lr = self._set_lr()
        train.set_epoch(epoch, self.batch)
        update, close = self.reporter.epoch_bar(len(train), f"{self.stage} {epoch + 1}/{optim.epochs}")
        try:
            sparse = optim.sparsity_regularization
            result = train_epoch(net, train, self.optimizer, l1=optim.s if sparse else 0.0,
                                 gate_l1=optim.gate_s if sparse else 0.0,
                                 scaler=self.scaler, amp_dtype=self.amp_dtype, on_batch=update,
                                 on_step=self._step_end, first=self.batch, label_smoothing=optim.label_smoothing)
        finally:
            close()
        if self.batch == self.steps_per_epoch:  # else a callback stopped the run inside the epoch
            self.epoch, self.batch = epoch + 1, 0
        tested = evaluate(self.model, test, self.amp_dtype)
        self.test_acc = tested.top1
        return {"stage": self.stage, "epoch": self.position, "lr": lr, "train_loss": round(result.loss, 5),
                "train_acc": round(result.accuracy, 3), "test_loss": round(tested.loss, 5),
                "test_acc": round(tested.top1, 3), "images_per_s": round(result.images_per_second, 1),
                "epoch_s": round(result.seconds, 2)}, result.seconds
