"""Latency statistics: summaries, bootstrap confidence intervals for a median and a speedup, and a verdict.

Pure numpy, no edgesmith import above the foundations: profiles (:mod:`edgesmith.profiling`), the
passes' own speed checks and the benchmarks all draw their numbers from here.

Two designs of speedup interval, chosen by how the samples were taken:

- :func:`paired_speedup` — samples taken in *rounds* (a block of runs per contender per round, the
  order rotating): the ratio is formed round by round, median(baseline block) / median(candidate
  block), and the interval is :func:`median_ci` of those ratios (resampling rounds). Drift of a
  shared machine hits both sides of a round's ratio, so it cancels. The benchmarks (``bench/``) and
  speculative decoding's paired rounds use it.
- :func:`bootstrap_speedup` — two pooled samples with no pairing: each is resampled on its own and
  the ratio of the resampled medians gives the interval. ``compare`` (two profiles measured at
  different times) and the passes' speed checks, which pool their alternating blocks, use it.

:func:`median_ci` is the one percentile bootstrap of a median (over rounds, prompts or pairs) that
both the benchmark tables and ``paired_speedup`` use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from edgesmith.errors import BadInput

CONFIDENCE = 0.95
Verdict = Literal["baseline", "faster", "slower", "within noise", "different shapes", "estimate"]


def summarize(latencies: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99, mean, std (sample, ddof=1), min, max and n of latencies in milliseconds."""
    values = np.asarray(latencies, dtype=np.float64)
    if values.size == 0:
        raise BadInput("no latencies to summarise; a profile needs at least one timed iteration")
    if not np.all(np.isfinite(values)):
        raise BadInput("latencies contain NaN or infinite values")
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": float(p50), "p90": float(p90), "p99": float(p99),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "min": float(values.min()), "max": float(values.max()),
        "n": int(values.size),
    }


def _bootstrap_medians(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``n_boot`` resamples (with replacement), computed in bounded-memory chunks."""
    n = values.size
    chunk = max(1, min(n_boot, 4_000_000 // n))
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = np.median(values[idx], axis=1)
    return out


def bootstrap_speedup(baseline_ms: Sequence[float], candidate_ms: Sequence[float], n_boot: int = 2000,
                      seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Speedup of ``candidate`` over ``baseline`` = median(baseline) / median(candidate), with a
    percentile bootstrap confidence interval from resampling both samples independently.

    Returns ``(speedup, low, high)``; a speedup above 1 means the candidate is faster.
    """
    base = np.asarray(baseline_ms, dtype=np.float64)
    cand = np.asarray(candidate_ms, dtype=np.float64)
    if base.size == 0 or cand.size == 0:
        raise BadInput("bootstrap_speedup needs latencies in both samples")
    if np.any(base <= 0) or np.any(cand <= 0):
        raise BadInput("latencies must be positive")
    if n_boot < 1 or not 0 < confidence < 1:
        raise BadInput("n_boot must be >= 1 and confidence between 0 and 1")
    rng = np.random.default_rng(seed)
    ratios = _bootstrap_medians(base, n_boot, rng) / _bootstrap_medians(cand, n_boot, rng)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(np.median(base) / np.median(cand)), float(low), float(high)


def median_ci(values: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
              confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """``(median, low, high)`` of ``values``: the percentile bootstrap interval of the median.

    The unit resampled is one value (a round's measurement, a pair's ratio); give one value per
    independent repetition, not every sample of a block."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise BadInput("median_ci needs at least one value")
    if not np.all(np.isfinite(v)):
        raise BadInput("median_ci: values contain NaN or infinite numbers")
    if n_boot < 1 or not 0 < confidence < 1:
        raise BadInput("n_boot must be >= 1 and confidence between 0 and 1")
    boot = _bootstrap_medians(v, n_boot, np.random.default_rng(seed))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(np.median(v)), float(low), float(high)


def paired_speedup(baseline_rounds: Sequence[Sequence[float]], candidate_rounds: Sequence[Sequence[float]], *,
                   n_boot: int = 2000, seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Speedup of ``candidate`` over ``baseline`` paired round by round, with a bootstrap interval.

    ``*_rounds[r]`` are the latencies of round ``r`` (a block; one number is a block of one). Per
    round: median(baseline block) / median(candidate block); the result is :func:`median_ci` of
    these ratios. Returns ``(speedup, low, high)``; above 1 means the candidate is faster."""
    if len(baseline_rounds) != len(candidate_rounds) or len(baseline_rounds) == 0:
        raise BadInput(f"paired_speedup needs the same, non-zero number of rounds on both sides "
                       f"(got {len(baseline_rounds)} and {len(candidate_rounds)})")
    if any(len(block) == 0 for block in [*baseline_rounds, *candidate_rounds]):
        raise BadInput("paired_speedup: every round needs at least one latency on both sides")
    base = np.asarray([np.median(block) for block in baseline_rounds], dtype=np.float64)
    cand = np.asarray([np.median(block) for block in candidate_rounds], dtype=np.float64)
    if np.any(base <= 0) or np.any(cand <= 0):
        raise BadInput("latencies must be positive")
    return median_ci(base / cand, n_boot=n_boot, seed=seed, confidence=confidence)


def verdict_of(low: float, high: float) -> Verdict:
    """'faster' / 'slower' only when the whole interval lies on one side of 1.0."""
    if low > 1.0:
        return "faster"
    if high < 1.0:
        return "slower"
    return "within noise"
