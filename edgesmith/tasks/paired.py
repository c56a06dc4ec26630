"""Accuracy with its interval, and the paired difference between two models on the same items.

Two accuracies measured on the same 570 questions are not independent samples: most items are
answered alike by both models, and only the items that *flip* carry information about the
difference. So the delta of a compressed model against its source is judged on the discordant
pairs: ``lost`` (the source right, the candidate wrong) and ``gained`` (the reverse), with
McNemar's exact test (a two-sided binomial test of ``lost`` against ``lost + gained`` at 1/2) and a
95 % interval for the paired difference of proportions (Wald, on the discordant counts). At
p = 0.3 and n = 570 one accuracy has a standard error of 1.9 points; a paired delta where 20 items
flip has one of about 0.8.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from edgesmith.errors import BadInput

Z95 = 1.959963984540054


@dataclass
class Accuracy:
    """A share of correct items with its standard error (lm-eval's: sample, n - 1) and a 95 % Wilson interval."""

    value: float
    n: int
    stderr: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy(correct: Sequence[float]) -> Accuracy:
    n = len(correct)
    if n == 0:
        raise BadInput("no item was scored; give a larger --limit")
    p = float(sum(correct)) / n
    stderr = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Accuracy(p, n, stderr, max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of ``lost`` of ``lost + gained`` at 1/2."""
    m = lost + gained
    if m == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


@dataclass
class PairedDelta:
    """Candidate minus reference on the same items: the delta, its 95 % interval, the flips and
    McNemar's p; ``lost_items``/``gained_items`` are the document ids that flipped."""

    delta: float
    low: float
    high: float
    n: int
    lost: int
    gained: int
    p_value: float
    lost_items: list = field(default_factory=list)
    gained_items: list = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.p_value >= 0.05:
            return "within noise"
        return "worse" if self.delta < 0 else "better"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def paired_delta(reference: Mapping, candidate: Mapping) -> PairedDelta:
    """Paired difference of two per-item 0/1 results keyed by document id (the same documents)."""
    if set(reference) != set(candidate):
        raise BadInput(f"paired comparison needs the same documents: the reference scored {len(reference)}, "
                       f"the candidate {len(candidate)}, {len(set(reference) ^ set(candidate))} differ")
    n = len(reference)
    if n == 0:
        raise BadInput("no item was scored; give a larger --limit")
    lost_items = sorted(k for k in reference if reference[k] >= 0.5 > candidate[k])
    gained_items = sorted(k for k in reference if candidate[k] >= 0.5 > reference[k])
    lost, gained = len(lost_items), len(gained_items)
    delta = (gained - lost) / n
    se = math.sqrt(max((lost + gained) - (gained - lost) ** 2 / n, 0.0)) / n
    return PairedDelta(delta, delta - Z95 * se, delta + Z95 * se, n, lost, gained, mcnemar_exact(lost, gained),
                       lost_items, gained_items)
