"""Where the quantizers sit in training (SWALP), and stochastic weight averaging.

* Activations and errors: the output of every conv and linear layer but the last (the logits stay
  full precision) is quantized in the forward pass, and the gradient arriving at it in the backward
  pass. Forward hooks do it, so layer names and checkpoints are those of the full-precision model.
* Gradients (after the L1 term), weights after each step, and momentum buffers: in the optimizer.
* Weight averaging (SWA): a full-precision running mean of the weights, once per epoch from
  ``--swa-start``, with batch-norm statistics re-estimated on the training data before use.

Block floating point with one exponent per slice of dim 0 (per output channel for weights, per
sample for activations and errors, per element for 1-D tensors) is the format of the paper.
"""
from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..probe import probe_forward
from .formats import BlockFloat, quantize


@dataclass
class LowPrecision:
    """Word lengths of the five quantized quantities (None: full precision) and the rounding."""

    weight: int | None = None
    grad: int | None = None
    activate: int | None = None
    error: int | None = None
    momentum: int | None = None
    rounding: str = "stochastic"

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.weight, self.grad, self.activate, self.error, self.momentum))

    def fmt(self, wl: int | None) -> BlockFloat | None:
        return None if wl is None else BlockFloat(wl, 0)

    def describe(self) -> dict[str, str]:
        return {name: (self.fmt(wl).describe() if wl else "fp32") for name, wl in
                (("weight", self.weight), ("grad", self.grad), ("activation", self.activate), ("error", self.error),
                 ("momentum", self.momentum))} | {"rounding": self.rounding}

    def relative_arithmetic_cost(self) -> float:
        """Bits x operations of a training MAC against fp32: forward multiplies weight by activation,
        the backward error by weight (input gradient) and error by activation (weight gradient)."""
        w, a, e = (b or 32 for b in (self.weight, self.activate, self.error))
        return (2 * w + 2 * a + 2 * e) / (6 * 32)


class _QuantizeFwdBwd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd, bwd, rounding, generator):
        ctx.bwd, ctx.rounding, ctx.generator = bwd, rounding, generator
        return quantize(x, fwd, rounding, generator) if fwd is not None else x

    @staticmethod
    def backward(ctx, grad):
        if ctx.bwd is not None:
            grad = quantize(grad, ctx.bwd, ctx.rounding, ctx.generator)
        return grad, None, None, None, None


def quantize_layer_outputs(model: nn.Module, lp: LowPrecision, generator: torch.Generator | None,
                           example: torch.Tensor) -> list:
    """Hook every conv/linear but the last one run (the logits); returns the hook handles."""
    order: list[nn.Module] = []
    probes = [m.register_forward_hook(lambda m, i, o: order.append(m)) for m in model.modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    probe_forward(model, example, probes)
    fwd, bwd = lp.fmt(lp.activate), lp.fmt(lp.error)

    def hook(module, inputs, output):
        # evaluation rounds to nearest: test accuracy is then a function of the weights alone
        rounding = lp.rounding if module.training else "nearest"
        return _QuantizeFwdBwd.apply(output, fwd, bwd, rounding, generator)

    last = order[-1] if order else None
    return [m.register_forward_hook(hook) for m in dict.fromkeys(order) if m is not last]


class LowPrecisionOptimizer:
    """Wraps an optimizer: quantize gradients, step in fp32, quantize weights and momentum buffers.

    No full-precision master copy is kept: the stored weights are the low-precision ones (SWALP).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lp: LowPrecision, generator: torch.Generator | None):
        self.optimizer, self.lp, self.generator = optimizer, lp, generator

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def _each(self, wl: int | None, tensors) -> None:
        if wl is None:
            return
        fmt = self.lp.fmt(wl)
        for t in tensors:
            t.copy_(quantize(t, fmt, self.lp.rounding, self.generator))

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self._each(self.lp.grad, [p.grad for p in params if p.grad is not None])
        loss = self.optimizer.step(closure)
        self._each(self.lp.weight, params)
        self._each(self.lp.momentum, [s["momentum_buffer"] for s in self.state.values()
                                      if s.get("momentum_buffer") is not None])
        return loss


class SWA:
    """Full-precision running mean of a model's weights, updated once per epoch."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).float()
        for m in self.model.modules():
            m._forward_hooks.clear()  # the average is a full-precision network: no quantizer hooks
        self.count = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1
        for avg, cur in zip(self.model.parameters(), model.parameters()):
            avg.add_(cur.detach().float() - avg, alpha=1.0 / self.count)

    @torch.no_grad()
    def recompute_bn(self, loader) -> None:
        """Batch-norm statistics of the averaged weights: a cumulative average over one pass."""
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        momenta = {m: m.momentum for m in bns}
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average
        self.model.train()
        for x, _ in loader:
            self.model(x)
        for m in bns:
            m.momentum = momenta[m]
        self.model.eval()

    def state_dict(self) -> dict:
        return {"count": self.count, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        self.model.load_state_dict(state["model"])


class Precision:
    """The low-precision pieces of one training stage: quantizer hooks, the optimizer wrapper,
    the stochastic-rounding generator (its state is checkpointed) and SWA."""

    def __init__(self, lp: LowPrecision, model: nn.Module, device: torch.device, seed: int, example: torch.Tensor,
                 swa: bool = False, swa_start: int = 0):
        self.lp = lp
        self.generator = torch.Generator(device).manual_seed(seed * 7919 + 17) if lp.active else None
        self.hooks = quantize_layer_outputs(model, lp, self.generator, example.to(device)) \
            if lp.activate or lp.error else []
        self.swa = SWA(model) if swa else None
        self.swa_start = swa_start

    def optimizer(self, optimizer: torch.optim.Optimizer):
        return LowPrecisionOptimizer(optimizer, self.lp, self.generator) if self.lp.active else optimizer

    def average(self, epoch: int, model: nn.Module, train_loader) -> nn.Module | None:
        """After epoch ``epoch`` (1-based): fold the weights into the average and return the averaged
        network with its batch-norm statistics re-estimated, or None before --swa-start."""
        if self.swa is None or epoch <= self.swa_start:
            return None
        self.swa.update(model)
        self.swa.recompute_bn(train_loader)
        return self.swa.model

    def state_dict(self) -> dict:
        gen = self.generator
        return {"generator": gen.get_state() if gen is not None else None,
                "generator_device": gen.device.type if gen is not None else None,
                "swa": self.swa.state_dict() if self.swa is not None else None}

    def load_state_dict(self, state: dict) -> str | None:
        """Restore a checkpoint's state; a note where the rounding stream could not continue."""
        note = None
        saved = state.get("generator")
        if self.generator is not None and saved is not None:
            # a generator's state is its device type's own (a CPU Mersenne twister: 5,056 bytes; a
            # CUDA Philox seed and offset: 16), and set_state refuses another type's
            was = state.get("generator_device") or ("cpu" if saved.numel() > 16 else "cuda")
            if was == self.generator.device.type:
                self.generator.set_state(saved)
            else:
                self.generator.manual_seed(zlib.crc32(saved.numpy().tobytes()))  # the same checkpoint, the same stream
                note = (f"stochastic rounding continues with a new random stream (the checkpoint's is for "
                        f"{was}, this run is on {self.generator.device.type})")
        if self.swa is not None and state.get("swa") is not None:
            self.swa.load_state_dict(state["swa"])
        return note
