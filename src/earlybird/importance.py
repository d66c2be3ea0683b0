"""Channel importance: how much each channel of each prunable BN matters. Masks keep the highest.

A criterion is one class with ``scores(model, layers)``, one 1-D float tensor per BN named in
``layers`` (one value per channel, on the CPU), and one line in ``IMPORTANCES``; the detector,
``earlybird prune --percent`` and the engine's ``--round-to`` all rank channels with it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .plugins import pick


class Importance:
    """A channel-ranking criterion. ``bind`` is called once, with the model and a few example
    inputs, before ``scores``: a criterion that needs the model's graph traces it there."""

    name = ""

    def bind(self, model: nn.Module, example_inputs: torch.Tensor) -> "Importance":
        return self

    def scores(self, model: nn.Module, layers: Sequence[str]) -> list[torch.Tensor]:
        raise NotImplementedError


class BNScale(Importance):
    """|gamma|, the batch-norm scale: network slimming's criterion, the paper's, and the default."""

    name = "bn-scale"

    @torch.no_grad()
    def scores(self, model, layers):
        return [model.get_submodule(n).weight.detach().abs().flatten().float().cpu() for n in layers]


class FilterNorm(Importance):
    """The L2 norm of the filters that produce each channel (Li et al., ICLR 2017), taken over
    every convolution or linear layer whose output channel goes with it (all those that add into
    one residual stream)."""

    name = "filter-l2"

    def __init__(self):
        self.producers: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None

    def bind(self, model, example_inputs):
        from .prune import channel_producers  # the engine's graph; the engine does not need this module

        self.producers = channel_producers(model, example_inputs)
        return self

    @torch.no_grad()
    def scores(self, model, layers):
        if self.producers is None:
            raise ConfigError("FilterNorm needs bind(model, example_inputs) first: it traces which layers produce "
                              "each channel")
        out = []
        for name in layers:
            size = model.get_submodule(name).weight.numel()
            squares, covered = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.bool)
            for layer, (channels, rows) in self.producers.get(name, {}).items():
                weight = model.get_submodule(layer).weight.detach().flatten(1).double().cpu()
                squares.index_add_(0, channels, weight.pow(2).sum(1)[rows])
                covered[channels] = True
            if not bool(covered.all()):
                raise ConfigError(f"--importance {self.name}: no convolution produces some channels of '{name}': "
                                  "use --importance bn-scale")
            out.append(squares.sqrt().float())
        return out


IMPORTANCES: dict[str, type[Importance]] = {c.name: c for c in (BNScale, FilterNorm)}


def make_importance(importance: Importance | str) -> Importance:
    """An Importance from its registry name (``--importance``), or the object itself."""
    return pick(importance, IMPORTANCES, Importance, "--importance")
