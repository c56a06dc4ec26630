"""Interleaved measurement: every contender timed in blocks, in rounds, in a rotating order.

Alternating single runs of different models evicts each one's weights from the CPU caches and
penalises the larger model (FIELD-NOTES), so each round runs a *block* of iterations per
contender, and the order rotates from round to round; drift of the machine (other jobs, clocks)
then hits all contenders alike. Ratios are computed round by round (median of the baseline's block
over median of the candidate's block in the same round) and their confidence interval comes from
resampling rounds (:func:`edgesmith.stats.paired_speedup`), so a slow round slows both sides of its ratio.

Contenders in worker processes (the encoder comparison: ``encoder_worker.py``) go through
:func:`run_block_rounds`, one request per block; in-process ones (the one-off studies) through
:func:`run_rounds`; the decoder peers (``llm_peers.measure``: a generation per prompt length per
round) walk :func:`rotation` themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgesmith import stats

log = logging.getLogger("bench.rounds")


@dataclass
class Timed:
    """One contender's latencies (ms), one list per round."""

    name: str
    rounds: list[list[float]] = field(default_factory=list)

    @property
    def all(self) -> list[float]:
        return [x for block in self.rounds for x in block]

    @property
    def round_medians(self) -> np.ndarray:
        return np.asarray([np.median(block) for block in self.rounds], dtype=np.float64)


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` rotated left by ``round_index`` (each contender leads one round in turn)."""
    k = round_index % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def timed_block(run: Callable[[int], object], block: int, warmup: int) -> list[float]:
    """``warmup`` untimed then ``block`` timed calls of ``run(i)``; the latencies in ms."""
    for i in range(warmup):
        run(i)
    block_ms = []
    for i in range(block):
        t0 = time.perf_counter()
        run(i)
        block_ms.append((time.perf_counter() - t0) * 1000.0)
    return block_ms


def run_block_rounds(blocks: dict[str, Callable[[int, int], list[float]]], *, rounds: int, block: int, warmup: int,
                     time_budget_s: float | None = None, min_rounds: int = 3,
                     on_round: Callable[[int], None] | None = None) -> dict[str, Timed]:
    """The rotating rounds: ``blocks[name](block, warmup)`` runs one contender's block wherever it lives
    (in this process: :func:`timed_block`; in a worker process: one request) and returns its latencies.
    ``time_budget_s`` stops after the round that spends it, never before ``min_rounds`` rounds (every
    contender always has the same number of complete rounds)."""
    if rounds < 1 or block < 1 or warmup < 0:
        raise ValueError("rounds and block must be at least 1, warmup at least 0")
    names = list(blocks)
    timed = {name: Timed(name) for name in names}
    started = time.perf_counter()
    for r in range(rounds):
        if (time_budget_s is not None and r >= min_rounds and time.perf_counter() - started >= time_budget_s):
            log.info("time budget of %.0f s spent after %d of %d rounds", time_budget_s, r, rounds)
            break
        for name in rotation(names, r):
            timed[name].rounds.append(list(blocks[name](block, warmup)))
        if on_round is not None:
            on_round(r)
    return timed


def run_rounds(runners: dict[str, Callable[[int], None]], *, rounds: int, block: int, warmup: int,
               time_budget_s: float | None = None, min_rounds: int = 3,
               on_round: Callable[[int], None] | None = None) -> dict[str, Timed]:
    """In-process contenders: ``runners[name](i)`` runs one inference on input batch ``i``, timed
    ``block`` times per round after ``warmup`` untimed runs (they bring the contender's weights back
    into the caches after the others ran), in :func:`run_block_rounds`' rotating order."""
    blocks = {name: (lambda n, w, run=run: timed_block(run, n, w)) for name, run in runners.items()}
    return run_block_rounds(blocks, rounds=rounds, block=block, warmup=warmup, time_budget_s=time_budget_s,
                            min_rounds=min_rounds, on_round=on_round)


def paired_speedup(baseline: Timed, candidate: Timed, *, n_boot: int = 2000, seed: int = 0,
                   confidence: float = stats.CONFIDENCE) -> tuple[float, float, float]:
    """``(speedup, low, high)`` of ``candidate`` over ``baseline``, paired by round
    (:func:`edgesmith.stats.paired_speedup`); above 1 means the candidate is faster."""
    return stats.paired_speedup(baseline.rounds, candidate.rounds, n_boot=n_boot, seed=seed, confidence=confidence)


def median_ci(values: Sequence[float | None], *, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """[median, low, high] over rounds (:func:`edgesmith.stats.median_ci`), None values left out;
    None when nothing is left (a contender that produced no number)."""
    kept = [v for v in values if v is not None]
    return list(stats.median_ci(kept, n_boot=n_boot, seed=seed)) if kept else None
