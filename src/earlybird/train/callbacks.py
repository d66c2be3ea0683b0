"""The callbacks every training stage can use: SWA, the metrics log and the last-epoch checkpoint."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..models import ModelSpec
from ..progress import MetricsLog
from ..prune import PrunePlan
from .checkpoint import save_checkpoint
from .loop import evaluate
from .trainer import Callback, Trainer


@dataclass
class Saver:
    """How a stage writes its checkpoints: the architecture (and plan) and the entries every one carries."""

    spec: ModelSpec
    plan: PrunePlan | None = None
    meta: dict = field(default_factory=dict)

    def save(self, path: Path, kind: str, model, **extra) -> Path:
        return save_checkpoint(path, kind, self.spec, model, self.plan, **extra, **self.meta)


class SWA(Callback):
    """Stochastic weight averaging (--swa): after each epoch past --swa-start, fold the weights into
    the average, evaluate it and save it as ``path``. Runs first: the record gains ``swa_test_acc``."""

    def __init__(self, saver: Saver, path: Path, train, test):
        self.saver, self.path, self.train, self.test = saver, path, train, test
        self.test_acc = None

    def on_epoch_end(self, trainer: Trainer, record: dict) -> str:
        averaged = trainer.precision.average(trainer.epoch, trainer.model, self.train)
        if averaged is None:
            return ""
        self.test_acc = record["swa_test_acc"] = round(evaluate(averaged, self.test).top1, 3)
        self.saver.save(self.path, "swa", averaged, epoch=trainer.epoch, test_acc=self.test_acc)
        return f"  swa {self.test_acc:.2f}%"


class Metrics(Callback):
    """One JSON line per epoch (and TensorBoard scalars with --tensorboard)."""

    def __init__(self, path: Path, tensorboard: bool):
        self.log = MetricsLog(path, tensorboard)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> str:
        self.log.write(**record)
        return ""

    def on_step(self, trainer: Trainer, record: dict) -> str:  # a draw inside an epoch: no TensorBoard step
        self.log.write(tensorboard=False, **record)
        return ""


class SaveLast(Callback):
    """The resumable checkpoint of the last epoch (or step of ``trainer.check_every``): the trainer's
    state with every callback's entries. Goes after the callbacks that change state, so that it holds
    what they did this epoch."""

    def __init__(self, saver: Saver, path: Path, kind: str):
        self.saver, self.path, self.kind = saver, path, kind

    def on_epoch_end(self, trainer: Trainer, record: dict) -> str:
        self.saver.save(self.path, self.kind, trainer.model, **trainer.state_dict())
        trainer.saved_at = trainer.where()
        return ""

    on_step = on_epoch_end  # a search that draws masks inside epochs resumes from the last draw


class SaveBest(Callback):
    """The checkpoint of the best test accuracy so far (``best``: its accuracy and epoch)."""

    def __init__(self, saver: Saver, path: Path, kind: str):
        self.saver, self.path, self.kind = saver, path, kind
        self.best = {"test_acc": -1.0, "epoch": None}

    def on_epoch_end(self, trainer: Trainer, record: dict) -> str:
        if record["test_acc"] > self.best["test_acc"]:
            self.best = {"test_acc": record["test_acc"], "epoch": trainer.epoch}
            self.saver.save(self.path, self.kind, trainer.model, epoch=trainer.epoch, test_acc=record["test_acc"])
        return ""

    def state_dict(self) -> dict:
        return {"best": dict(self.best)}

    def load_state_dict(self, ckpt: dict) -> None:
        self.best = dict(ckpt["best"])
