"""Budget tickets: the pruning ratio whose pruned network meets a MACs or parameter budget.

Coupling (channels that only go together), the collapse guard and ``round_to`` all give channels
back, so the ratio that halves the MACs is not 0.5 and differs between models: it is solved on the
network itself, by bisection over the ratio, measuring each candidate's pruned network.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .cost import count_macs, count_params
from .errors import ConfigError, PruneError
from .masks import ChannelIndex, channel_mask
from .prune import pruned_architecture, shapes_only

METRICS = ("macs", "params")


@dataclass(frozen=True)
class BudgetTicket:
    ratio: float  # of the prunable channels, as --percent would take it
    masks: dict[str, torch.Tensor]  # BN name -> keep mask
    metric: str
    asked: float  # the budget, a fraction of the dense network's MACs or parameters
    reached: float  # what the pruned network has


def budget_key(metric: str, fraction: float) -> str:
    """A budget's name among detector targets, in files and summaries: macs50 for half the MACs."""
    return f"{metric}{round(fraction * 100)}"


def parse_budget_key(key: str) -> tuple[str, float]:
    """(metric, fraction) of a ``budget_key``."""
    metric = next(m for m in METRICS if key.startswith(m))
    return metric, int(key[len(metric):]) / 100


def prune_flags(target: float | str) -> str:
    """The ``earlybird prune`` flag that asks for a target: --percent p, or --target-macs f."""
    if isinstance(target, str):
        metric, fraction = parse_budget_key(target)
        return f"--target-{metric} {fraction:g}"
    return f"--percent {target:g}"


def check_budget(metric: str, fraction: float) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown budget '{metric}': choose macs or params")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--target-{metric} {fraction:g} is outside (0, 1): pass e.g. 0.5 for half the dense "
                          f"network's {metric.upper() if metric == 'macs' else metric}")


def solve_budget(model: nn.Module, scores: Mapping[str, torch.Tensor], example_inputs: torch.Tensor, metric: str,
                 fraction: float, ties: Sequence = (), min_channels: int = 1, keep_streams: bool = False,
                 round_to: int = 1, steps: int = 12) -> BudgetTicket:
    """The smallest ratio (to 2^-``steps``) whose pruned ``model`` has at most ``fraction`` of the dense
    MACs or parameters, with its masks. ``scores``: BN name -> channel importance over the layers to
    prune (their order is the mask's); ``ties`` as ``EarlyBird(ties=)`` takes them."""
    check_budget(metric, fraction)
    index = ChannelIndex(tuple(scores), tuple(int(s.numel()) for s in scores.values()))
    flat, flat_ties = index.join(scores), index.flat_ties(ties)
    shape = tuple(example_inputs.shape[1:])

    def measure(net: nn.Module) -> int:
        return count_macs(net, shape) if metric == "macs" else count_params(net)

    dense = measure(shapes_only(model))  # a forward on the meta device: shapes, no arithmetic

    def pruned_at(ratio: float) -> tuple[float, dict[str, torch.Tensor]]:
        masks = index.split(channel_mask(flat, ratio, index.sizes, min_channels, flat_ties))
        # the architecture alone: sizes are the pruned network's own (folds add parameters, never MACs)
        small = pruned_architecture(model, masks, example_inputs, keep_streams, round_to, dict(scores),
                                    folds=metric == "params")
        return measure(small) / dense, masks

    lo, hi = 0.0, 0.99  # the metric falls as the ratio grows: keep the smallest ratio that meets it
    best = pruned_at(hi)
    if best[0] > fraction:
        raise PruneError(f"even pruning 99% of the prunable channels leaves {best[0]:.2f} of the dense network's "
                         f"{metric}: --target-{metric} {fraction:g} cannot be met (coupled channels stay); ask for "
                         f"at least {best[0]:.2f}")
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = pruned_at(mid)
        if got[0] <= fraction:
            hi, best = mid, got
        else:
            lo = mid
    return BudgetTicket(hi, best[1], metric, fraction, best[0])


@dataclass
class BudgetTarget:
    """A budget as a detector target: every epoch, the mask of the ratio that meets it on that
    epoch's scores enters the window like a fixed ratio's. Pruned sizes depend on which channels
    go, not on the weights, so it measures a structural copy of the model taken as it is built:
    the training model may be wrapped or accelerated meanwhile."""

    metric: str
    fraction: float
    model: nn.Module  # the dense network (copied)
    example_inputs: torch.Tensor
    ties: Sequence = ()
    min_channels: int = 1
    keep_streams: bool = False
    round_to: int = 1
    last: BudgetTicket | None = None  # what the latest step solved: a ticket that emerges records it

    def __post_init__(self):
        check_budget(self.metric, self.fraction)
        self.model = copy.deepcopy(self.model).cpu().eval()
        self.example_inputs = self.example_inputs[:2].cpu()

    @property
    def key(self) -> str:
        """Its name among the detector's targets, in files and summaries: e.g. macs50."""
        return budget_key(self.metric, self.fraction)

    def solve(self, scores: Mapping[str, torch.Tensor]) -> BudgetTicket:
        self.last = solve_budget(self.model, scores, self.example_inputs, self.metric, self.fraction, self.ties,
                                 self.min_channels, self.keep_streams, self.round_to)
        return self.last
