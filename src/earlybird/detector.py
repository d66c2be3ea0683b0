"""The Early-Bird detector: one gamma snapshot per epoch, a window of masks per ratio.

Rule ("star", as in the reference code): the ticket of ratio p emerges at epoch e when the
window is full and the mask of epoch e lies within ``threshold`` (<=) of *each* of the previous
``window - 1`` masks. We use it rather than the paper's wording (``window`` consecutive distances
each below the threshold, a "chain") because it bounds the drift across the whole window by the
threshold; a chain of small steps can add up to ``(window - 1) * threshold`` of drift.
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from .errors import ConfigError
from .masks import _as_bn_list, bn_gammas, channel_mask, check_ratio, flat_ties, mask_distance, prunable_bns


class EarlyBird:
    """Tracks channel masks at several pruning ratios and says when each one has settled.

    Step it once per epoch, after training (``step(epochs_completed)``); it returns the ratios
    whose ticket emerged at that step. ``emerged`` maps ratio -> epoch, ``tickets`` ratio -> mask.
    """

    def __init__(
        self,
        model_or_bns,
        ratios=(0.3, 0.5, 0.7),
        window: int = 5,
        threshold: float = 0.1,
        min_channels: int = 1,
        layers=None,
        ties=(),
    ):
        if window < 2:
            raise ConfigError(f"--eb-window {window} is too small: the rule compares at least two masks")
        if not 0.0 <= threshold < 1.0:
            raise ConfigError(f"--eb-threshold {threshold:g} is outside [0, 1): it is a fraction of channels")
        self.ratios = tuple(sorted({check_ratio(r) for r in ratios}))
        if not self.ratios:
            raise ConfigError("no pruning ratios given: pass e.g. --ratios 0.3 0.5 0.7")
        if isinstance(model_or_bns, nn.Module):
            # ``layers``: the BN names to watch, e.g. earlybird.prune.prunable_layers(model, x)
            named = prunable_bns(model_or_bns)
            if layers is not None:
                unknown = set(layers) - {n for n, _ in named}
                if unknown:
                    raise ConfigError(f"no batch-norm layers named {', '.join(sorted(unknown))} in the model")
                named = [(n, m) for n, m in named if n in set(layers)]
            self.layer_names = [n for n, _ in named]
            self._bns = [m for _, m in named]
        else:
            self._bns = _as_bn_list(model_or_bns)
            self.layer_names = [f"bn{i}" for i in range(len(self._bns))]
        if not self._bns:
            raise ConfigError("the model has no batch-norm layers: Early-Bird masks come from BN scales")
        self.layer_sizes = [m.weight.numel() for m in self._bns]
        # ``ties``: lists of (BN name, channel) that go together (earlybird.prune.channel_ties)
        self.ties = flat_ties(ties, self.layer_names, self.layer_sizes)
        self.window = window
        self.threshold = threshold
        self.min_channels = min_channels
        self.epoch = 0
        self._recent: dict[float, deque] = {r: deque(maxlen=window) for r in self.ratios}
        self.emerged: dict[float, int] = {}
        self.tickets: dict[float, torch.Tensor] = {}
        self.distances: dict[float, list[float]] = {r: [] for r in self.ratios}

    @property
    def num_channels(self) -> int:
        return sum(self.layer_sizes)

    @property
    def done(self) -> bool:
        """True once every ratio has its ticket."""
        return len(self.emerged) == len(self.ratios)

    def layer_masks(self, ratio: float, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The ticket of ``ratio`` (or ``mask``) as BN name -> keep mask, as prune_model takes it."""
        mask = self.tickets[float(ratio)] if mask is None else mask
        return dict(zip(self.layer_names, torch.split(mask, self.layer_sizes)))

    def mask(self, ratio: float) -> torch.Tensor:
        """The newest mask of ``ratio``."""
        return self._recent[float(ratio)][-1]

    def step(self, epoch: int | None = None) -> list[float]:
        """Take this epoch's gamma snapshot; return the ratios whose ticket emerged now."""
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)
        gammas = bn_gammas(self._bns)
        new = []
        for r in self.ratios:
            mask = channel_mask(gammas, r, self.layer_sizes, self.min_channels, self.ties)
            recent = self._recent[r]
            recent.append(mask)
            self.distances[r] = [mask_distance(mask, old) for old in list(recent)[:-1]]
            if (
                r not in self.emerged
                and len(recent) == self.window
                and all(d <= self.threshold for d in self.distances[r])
            ):
                self.emerged[r] = self.epoch
                self.tickets[r] = mask.clone()
                new.append(r)
        return new

    def state_dict(self) -> dict:
        """Plain values and tensors only, so it saves inside a weights-only checkpoint."""
        return {
            "ratios": list(self.ratios),
            "window": self.window,
            "threshold": self.threshold,
            "min_channels": self.min_channels,
            "layer_sizes": list(self.layer_sizes),
            "epoch": self.epoch,
            "recent": {str(r): torch.stack(list(q)) if q else torch.zeros(0) for r, q in self._recent.items()},
            "emerged": {str(r): e for r, e in self.emerged.items()},
            "tickets": {str(r): m for r, m in self.tickets.items()},
            "distances": {str(r): d for r, d in self.distances.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        same = (
            list(state["ratios"]) == list(self.ratios)
            and state["window"] == self.window
            and state["layer_sizes"] == self.layer_sizes
        )
        if not same:
            raise ConfigError(
                "the saved detector used other ratios, window or layers than this run: "
                "resume with the flags of the original run"
            )
        self.epoch = state["epoch"]
        for r in self.ratios:
            saved = state["recent"][str(r)]
            self._recent[r] = deque(list(saved) if saved.numel() else [], maxlen=self.window)
            self.distances[r] = list(state["distances"][str(r)])
        self.emerged = {float(r): int(e) for r, e in state["emerged"].items()}
        self.tickets = {float(r): m for r, m in state["tickets"].items()}
