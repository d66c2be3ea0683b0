"""When has a ratio's mask settled? The Early-Bird detection rules.

A rule looks at the window of the newest masks (oldest first) and names the distances it bounds;
the ticket emerges when the window is full and each of them is at most the threshold.

* ``star`` (the reference code's, the default): the newest mask against each of the others. It
  bounds the drift across the whole window by the threshold.
* ``chain`` (the paper's wording): each mask against the one before it. Steps just under the
  threshold pass, so the window may drift by up to (window - 1) x threshold.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .masks import mask_distance
from .plugins import pick


class Rule:
    name = ""

    def distances(self, window: Sequence[torch.Tensor]) -> list[float]:
        raise NotImplementedError

    def settled(self, distances: Sequence[float], threshold: float) -> bool:
        """Whether a full window whose ``distances`` (this rule's) are these has settled."""
        return all(d <= threshold for d in distances)


class Star(Rule):
    name = "star"

    def distances(self, window):
        return [mask_distance(window[-1], old) for old in window[:-1]]


class Chain(Rule):
    name = "chain"

    def distances(self, window):
        return [mask_distance(b, a) for a, b in zip(window[:-1], window[1:])]


RULES: dict[str, type[Rule]] = {c.name: c for c in (Star, Chain)}


def make_rule(rule: Rule | str) -> Rule:
    """A Rule from its registry name (``--eb-rule``), or the object itself."""
    return pick(rule, RULES, Rule, "--eb-rule")
