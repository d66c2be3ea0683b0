"""The Early-Bird detector: one importance snapshot per step, a window of masks per ratio.

At each step (once per epoch, or every ``interval`` of an epoch) it ranks the channels
(``importance``: |gamma| by default), computes every ratio's mask and asks the detection ``rule``
(``rules.py``: the reference code's "star" by default) whether the window of the newest masks has
settled.

The threshold is a rate: the mask distance allowed between masks one epoch apart, as the
reference draws them. Masks drawn ``interval`` epochs apart may differ by ``threshold x interval``.
Unscaled, the rule would mean less the finer the interval: masks 0.1 epoch apart differ by a few
hundredths even while they still move steadily, so 0.1 would pass at the first full window.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .budget import BudgetTarget
from .importance import Importance, make_importance
from .masks import ChannelIndex, channel_mask, check_ratio
from .rules import Rule, make_rule


def position(epochs: float) -> float | int:
    """A point of training in epochs: whole epochs as an int (as epochs were counted before
    detection inside an epoch), else rounded to 6 places."""
    return round(epochs) if abs(epochs - round(epochs)) < 1e-9 else round(epochs, 6)


def _key(target: float | str) -> float | str:
    return target if isinstance(target, str) else float(target)


class EarlyBird:
    """Tracks channel masks at several pruning ratios and says when each one has settled.

    Step it once per epoch, after training (``step(epochs_completed)``), or every ``interval``
    epochs (e.g. 0.1; ``step(epochs_trained)`` with the fraction); it returns the ratios whose ticket
    emerged at that step. ``emerged`` maps ratio -> epoch (fractional inside an epoch), ``tickets``
    ratio -> mask. ``threshold`` bounds the distance of masks one epoch apart: the window's masks,
    ``interval`` apart, may differ by ``threshold * interval`` (``bound``).
    ``layers``: the BN names to watch (default: every affine BN), e.g.
    ``earlybird.prune.prunable_layers(model, x)``; ``ties``: lists of (BN name, channel) that go
    together (``earlybird.prune.channel_ties``). ``importance`` and ``rule`` take a registry name
    or an object (an Importance that needs it must be bound to the model already). ``kind_ratios``:
    fixed ratios of heads or neurons for every target (e.g. {"head": 0.25}). ``budgets``:
    ``earlybird.budget.BudgetTarget`` objects, targets next to the ratios, keyed by their ``key``
    (e.g. "macs50") in ``emerged``, ``tickets`` and ``distances``.
    """

    def __init__(
        self,
        model: nn.Module,
        ratios=(0.3, 0.5, 0.7),
        window: int = 5,
        threshold: float = 0.1,
        min_channels: int = 1,
        layers=None,
        ties=(),
        importance: Importance | str = "bn-scale",
        rule: Rule | str = "star",
        budgets: Sequence[BudgetTarget] = (),
        interval: float = 1.0,
        kind_ratios: dict[str, float] | None = None,
    ):
        if window < 2:
            raise ConfigError(f"--eb-window {window} is too small: the rule compares at least two masks")
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"--eb-threshold {threshold:g} is outside [0, 1): it is a fraction of channels")
        self.ratios = tuple(sorted({check_ratio(r) for r in ratios}))
        self.budgets = {b.key: b for b in budgets}
        # the targets: each ratio (a float) and each budget (its key, e.g. "macs50")
        self.targets: tuple[float | str, ...] = self.ratios + tuple(self.budgets)
        if not self.targets:
            raise ConfigError("no pruning ratios given: pass e.g. --ratios 0.3 0.5 0.7")
        self.model = model
        self.index = ChannelIndex.of(model, layers)
        self.ties = self.index.flat_ties(ties)
        self.importance = make_importance(importance)
        self.rule = make_rule(rule)
        if not interval > 0:
            raise ConfigError(f"the detector's interval {interval:g} must be a positive number of epochs")
        self.window = window
        self.threshold = threshold
        self.interval = float(interval)
        self.min_channels = min_channels
        self.kind_ratios = {k: check_ratio(r) for k, r in (kind_ratios or {}).items()}
        self.epoch: float = 0
        self._recent: dict[float | str, deque] = {r: deque(maxlen=window) for r in self.targets}
        self.emerged: dict[float | str, float] = {}
        self.tickets: dict[float | str, torch.Tensor] = {}
        self.distances: dict[float | str, list[float]] = {r: [] for r in self.targets}
        # per ratio, the full window that came closest to settling: (largest distance in it, epoch)
        self.closest: dict[float | str, tuple[float, float]] = {}

    @property
    def bound(self) -> float:
        """The largest distance the rule allows between the window's masks, ``interval`` apart."""
        return self.threshold * self.interval

    @property
    def layer_names(self) -> list[str]:
        return list(self.index.names)

    @property
    def layer_sizes(self) -> list[int]:
        return list(self.index.sizes)

    def scores(self) -> torch.Tensor:
        """The importance of every watched channel now, flat in mask order."""
        return torch.cat(self.importance.scores(self.model, self.index.names))

    @property
    def num_channels(self) -> int:
        return self.index.total

    @property
    def done(self) -> bool:
        """True once every ratio has its ticket."""
        return len(self.emerged) == len(self.targets)

    def layer_masks(self, ratio: float | str, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ticket of ``ratio`` (or ``mask``) as BN name -> keep mask, as prune_model takes it."""
        mask = self.tickets[_key(ratio)] if mask is None else mask
        return self.index.split(mask)

    def mask(self, ratio: float | str) -> torch.Tensor:
        """The newest mask of ``ratio``."""
        return self._recent[_key(ratio)][-1]

    def step(self, epoch: float | None = None, scores: torch.Tensor | None = None) -> list[float | str]:
        """Take this step's snapshot (``scores``, or ``self.scores()``) after ``epoch`` epochs of
        training (default: ``interval`` more than the last); return the ratios whose ticket emerged now."""
        self.epoch = position(self.epoch + self.interval if epoch is None else epoch)
        scores = self.scores() if scores is None else scores
        new = []
        for r in self.targets:
            mask = self._mask(r, scores)
            recent = self._recent[r]
            recent.append(mask)
            self.distances[r] = self.rule.distances(list(recent))
            full = len(recent) == self.window
            if full and (r not in self.closest or max(self.distances[r]) < self.closest[r][0]):
                self.closest[r] = (max(self.distances[r]), self.epoch)
            if r not in self.emerged and full and self.rule.settled(self.distances[r], self.bound):
                self.emerged[r] = self.epoch
                self.tickets[r] = mask.clone()
                new.append(r)
        return new

    def _mask(self, target: float | str, scores: torch.Tensor) -> torch.Tensor:
        """This epoch's mask of a ratio, or of the ratio that meets a budget."""
        if isinstance(target, str):
            return self.index.join(self.budgets[target].solve(self.index.split(scores)).masks)
        return channel_mask(scores, target, self.layer_sizes, self.min_channels, self.ties, self.index.kinds,
                            self.kind_ratios)

    def state_dict(self) -> dict:
        """Plain values and tensors only, so it saves inside a weights-only checkpoint."""
        return {
            "ratios": list(self.ratios),
            "budgets": list(self.budgets),
            "window": self.window,
            "threshold": self.threshold,
            "interval": self.interval,
            "min_channels": self.min_channels,
            "layer_sizes": list(self.layer_sizes),
            "kinds": list(self.index.kinds),
            "kind_ratios": dict(self.kind_ratios),
            "importance": self.importance.name,
            "rule": self.rule.name,
            "ties": [list(t) for t in self.ties],
            "epoch": self.epoch,
            "recent": {str(r): torch.stack(list(q)) if q else torch.zeros(0) for r, q in self._recent.items()},
            "emerged": {str(r): e for r, e in self.emerged.items()},
            "tickets": {str(r): m for r, m in self.tickets.items()},
            "distances": {str(r): d for r, d in self.distances.items()},
            "closest": {str(r): list(c) for r, c in self.closest.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        same = (
            list(state["ratios"]) == list(self.ratios)
            and list(state.get("budgets", [])) == list(self.budgets)
            and state["window"] == self.window
            and abs(state.get("interval", 1.0) - self.interval) < 1e-9
            and state["layer_sizes"] == self.layer_sizes
            and state.get("importance", "bn-scale") == self.importance.name
            and state.get("rule", "star") == self.rule.name
            and dict(state.get("kind_ratios", {})) == self.kind_ratios
        )
        if not same:
            raise ConfigError(
                "the saved detector used other ratios, window, interval, layers, importance, rule or head and neuron "
                "ratios than this "
                "run: resume with the flags of the original run"
            )
        self.epoch = state["epoch"]
        key = {str(t): t for t in self.targets}
        for r in self.targets:
            saved = state["recent"][str(r)]
            self._recent[r] = deque(list(saved) if saved.numel() else [], maxlen=self.window)
            self.distances[r] = list(state["distances"][str(r)])
        self.emerged = {key[r]: e for r, e in state["emerged"].items()}
        self.tickets = {key[r]: m for r, m in state["tickets"].items()}
        self.closest = {key[r]: (float(d), e) for r, (d, e) in state.get("closest", {}).items()}
