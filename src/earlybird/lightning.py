"""Early-Bird inside a Lightning training run (``pip install "earlybird[lightning]"``).

    callback = EarlyBirdCallback(ratios=[0.5], example_inputs=x[:2], module="net", save_dir="tickets")
    trainer = lightning.Trainer(max_epochs=160, callbacks=[callback])
    trainer.fit(lit_module, train_loader)          # stops once every ratio has its ticket
    small, plan = callback.prune(0.5)              # earlybird.prune_model on the ticket
    lit_module.net = small                         # then retrain: a fresh optimizer for the small network
    lightning.Trainer(max_epochs=80).fit(lit_module, train_loader)

``every_n_steps=N`` draws the masks every N optimizer steps instead of at each epoch's end (a
fine-tune that lasts a few epochs finds its ticket inside the first); the threshold then bounds
masks that far apart in proportion (it is per epoch, see ``earlybird.detector``), and a ticket found
inside an epoch stops the run after that step.

L1 on the BN scales goes in ``on_before_optimizer_step``, which Lightning calls after unscaling the
gradients under 16-bit mixed precision. Under DDP every rank steps the detector on rank 0's scores
(they agree anyway: the weights are the same), so all ranks stop together; rank 0 writes the files.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from .detector import EarlyBird
from .files import atomic_write, tensor_bytes
from .gates import attach_gates
from .importance import Importance, make_importance
from .prune import PrunePlan, channel_ties, prunable_layers, prune_model
from .rules import Rule
from .sparsity import add_bn_l1_grad, add_gate_l1_grad


class EarlyBirdCallback(pl.Callback):
    """Trains with network slimming's L1, draws the Early-Bird tickets and stops the run.

    ``module``: the attribute of the LightningModule holding the network to prune (default: the
    LightningModule itself); ``example_inputs``: a few inputs of the network's shape, with which the
    BNs the engine can prune are found (without them every affine BN is watched); ``save_dir``:
    where rank 0 writes each ticket (EB-<percent>-<epoch>.pth: the BN masks and the weights; the
    epoch has a fraction inside an epoch); ``every_n_steps``: draw the masks every that many optimizer
    steps (default: at each epoch's end). ``gates``: put gates on the network's attention heads and
    MLP neurons (``earlybird.gates``) in ``setup``, before ``configure_optimizers`` collects the
    parameters, with ``gate_l1`` the L1 on them (EarlyBERT's 1e-4); BN scales take ``l1``.
    ``tickets`` maps ratio -> layer name -> keep mask, as ``prune_model`` takes them."""

    def __init__(self, ratios=(0.3, 0.5, 0.7), example_inputs: torch.Tensor | None = None, module: str | None = None,
                 l1: float = 1e-4, window: int = 5, threshold: float = 0.1, min_channels: int = 1,
                 importance: Importance | str = "bn-scale", rule: Rule | str = "star", save_dir: str | None = None,
                 stop: bool = True, every_n_steps: int | None = None, gates: bool = True, gate_l1: float = 1e-4):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: draw the masks every 1 or more steps")
        self.ratios, self.example_inputs, self.module_name, self.l1 = ratios, example_inputs, module, l1
        self.window, self.threshold, self.min_channels, self.rule = window, threshold, min_channels, rule
        self.importance, self.save_dir, self.stop = make_importance(importance), save_dir, stop
        self.every_n_steps, self._drawn = every_n_steps, None
        self.gates, self.gate_l1 = gates, gate_l1
        self.detector: EarlyBird | None = None
        self._state: dict | None = None

    def network(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module if self.module_name is None else pl_module.get_submodule(self.module_name)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.detector is not None:
            return
        net, layers, ties = self.network(pl_module), None, ()
        if self.gates:
            attach_gates(net)
        if self.example_inputs is not None:
            example = self.example_inputs.to(next(net.parameters()).device)
            layers, ties = prunable_layers(net, example), channel_ties(net, example)
            self.importance.bind(net, example)
        self.detector = EarlyBird(net, self.ratios, self.window, self.threshold, self.min_channels, layers, ties,
                                  self.importance, self.rule)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps:  # the epoch's length is known once the loaders are
            if not math.isfinite(trainer.num_training_batches):
                raise ValueError("every_n_steps needs a training loader with a length: the threshold is per epoch")
            per_epoch = trainer.num_training_batches / trainer.accumulate_grad_batches
            self.detector.interval = self.every_n_steps / per_epoch
        if self._state is not None:  # a resumed run: the detector's window and tickets
            self.detector.load_state_dict(self._state)
            self._state = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.l1:
            add_bn_l1_grad(self.network(pl_module), self.l1)
        if self.gate_l1:
            add_gate_l1_grad(self.network(pl_module), self.gate_l1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._drawn:
            self._drawn = step  # accumulating gradients, several batches end at one optimizer step
            self._draw(trainer, pl_module, trainer.current_epoch + (batch_idx + 1) / trainer.num_training_batches)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.every_n_steps:
            self._draw(trainer, pl_module, trainer.current_epoch + 1)

    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: float) -> None:
        det = self.detector
        scores = trainer.strategy.broadcast(det.scores(), src=0)  # one decision on every rank
        for r in det.step(epoch, scores):
            pl_module.print(f"Early-Bird ticket for {r:.0%} pruning at epoch {det.emerged[r]}")
            if self.save_dir and trainer.is_global_zero:
                self._save(r, self.network(pl_module))
        pl_module.log_dict({f"eb/max_distance_{r:g}": max(d) for r, d in det.distances.items() if d},
                           rank_zero_only=True)
        if self.stop and det.done:
            trainer.should_stop = True

    def _save(self, ratio: float, net: nn.Module) -> Path:
        path = Path(self.save_dir) / f"EB-{round(ratio * 100)}-{self.detector.emerged[ratio]}.pth"
        # plain tensors: torch.load(..., weights_only=True) reads it
        ticket = {"ratio": ratio, "epoch": self.detector.emerged[ratio], "masks": self.tickets[ratio],
                  "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
        return atomic_write(path, lambda f: torch.save(ticket, f), tensor_bytes(ticket))

    @property
    def tickets(self) -> dict[float, dict[str, torch.Tensor]]:
        return {r: self.detector.layer_masks(r) for r in self.detector.tickets} if self.detector else {}

    def prune(self, ratio: float, pl_module: pl.LightningModule | None = None, example_inputs=None,
              round_to: int = 1) -> tuple[nn.Module, PrunePlan]:
        """The network of the run (``pl_module``, or the one fitted last) physically pruned to the
        ticket of ``ratio``, in the mode the network is in: Lightning keeps modules' modes as it
        finds them, so a retrain in a second ``fit`` normalizes with batch statistics."""
        net = self.network(pl_module) if pl_module is not None else self.detector.model
        example = self.example_inputs if example_inputs is None else example_inputs
        if example is None:
            raise ValueError("prune needs example_inputs: a few inputs of the network's shape")
        return prune_model(net, self.tickets[ratio], example.to(next(net.parameters()).device), round_to=round_to)

    def state_dict(self) -> dict:
        return self.detector.state_dict() if self.detector else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Taken back at the start of training, once the interval of the draws is known."""
        self._state = state_dict or None
