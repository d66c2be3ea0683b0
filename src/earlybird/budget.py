"""Budget tickets: the pruning ratio whose pruned network meets a MACs or parameter budget.

Coupling (channels that only go together), the collapse guard and ``round_to`` all give channels
back, so the ratio that halves the MACs is not 0.5 and differs between models: it is solved on the
network itself, by bisection over the ratio, measuring each candidate's pruned network (from the
previous epoch's ratio, a few candidates around it).
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
                 round_to: int = 1, steps: int = 12, near: float | None = None,
                 kind_ratios: Mapping[str, float] | None = None) -> BudgetTicket:
    """The smallest ratio (to 2^-``steps``) whose pruned ``model`` has at most ``fraction`` of the dense
    MACs or parameters, with its masks. ``scores``: BN name -> channel importance over the layers to
    prune, BNs or gates (their order is the mask's); ``ties`` as ``EarlyBird(ties=)`` takes them. ``near``: a ratio
    the answer is likely close to (the previous epoch's): the search starts there and widens its
    bracket step by doubling step, measuring a few candidates instead of ``steps`` + 1, for the same answer.
    ``kind_ratios``: kinds of units pruned at a fixed ratio whatever the candidate (--head-ratio)."""
    check_budget(metric, fraction)
    index = ChannelIndex.of(model, list(scores))  # the kinds of units too: heads and neurons rank apart
    flat, flat_ties = index.join(scores), index.flat_ties(ties)
    shape = tuple(example_inputs.shape[1:])
    top = 2 ** steps  # candidates are the ratios 0.99 k / top, k = 1..top

    def measure(net: nn.Module) -> int:
        return count_macs(net, shape) if metric == "macs" else count_params(net)

    dense = measure(shapes_only(model))  # a forward on the meta device: shapes, no arithmetic
    tried: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}

    def meets(k: int) -> bool:
        """Whether the network pruned at candidate k meets the budget (the metric falls as k grows)."""
        if k not in tried:
            masks = index.split(channel_mask(flat, 0.99 * k / top, index.sizes, min_channels, flat_ties, index.kinds,
                                             kind_ratios))
            # the architecture alone: sizes are the pruned network's own (folds add parameters, never MACs)
            small = pruned_architecture(model, masks, example_inputs, keep_streams, round_to, dict(scores),
                                        folds=metric == "params")
            tried[k] = measure(small) / dense, masks
        return tried[k][0] <= fraction

    def unreachable() -> PruneError:
        return PruneError(f"even pruning 99% of the prunable channels leaves {tried[top][0]:.2f} of the dense "
                          f"network's {metric}: --target-{metric} {fraction:g} cannot be met (coupled channels "
                          f"stay); ask for at least {tried[top][0]:.2f}")

    # a bracket: candidate lo misses the budget (or is 0, never tried), hi meets it
    if near is None:
        lo, hi = 0, top
        if not meets(top):
            raise unreachable()
    else:
        k, step = min(max(round(near / 0.99 * top), 1), top), 1
        if meets(k):
            lo, hi = k, k
            while lo > 0 and meets(lo):
                hi, lo, step = lo, max(lo - step, 0), step * 2
        else:
            lo, hi = k, k
            while not meets(hi):
                if hi == top:
                    raise unreachable()
                lo, hi, step = hi, min(hi + step, top), step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return BudgetTicket(0.99 * hi / top, tried[hi][1], metric, fraction, tried[hi][0])


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
    kind_ratios: dict[str, float] | None = None  # heads or neurons at a fixed ratio

    def __post_init__(self):
        check_budget(self.metric, self.fraction)
        self.model = copy.deepcopy(self.model).cpu().eval()
        self.example_inputs = self.example_inputs[:2].cpu()

    @property
    def key(self) -> str:
        """Its name among the detector's targets, in files and summaries: e.g. macs50."""
        return budget_key(self.metric, self.fraction)

    def solve(self, scores: Mapping[str, torch.Tensor]) -> BudgetTicket:
        # masks settle from epoch to epoch, and so does the ratio that meets the budget: start at the last one
        self.last = solve_budget(self.model, scores, self.example_inputs, self.metric, self.fraction, self.ties,
                                 self.min_channels, self.keep_streams, self.round_to,
                                 near=self.last.ratio if self.last else None, kind_ratios=self.kind_ratios)
        return self.last
