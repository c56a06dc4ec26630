"""Latency statistics: summaries, a bootstrap confidence interval for a speedup, and its verdict.

Pure numpy, no edgesmith import above the foundations: profiles (:mod:`edgesmith.profiling`), the
passes' own speed checks and the benchmarks all draw their numbers from here.
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


def verdict_of(low: float, high: float) -> Verdict:
    """'faster' / 'slower' only when the whole interval lies on one side of 1.0."""
    if low > 1.0:
        return "faster"
    if high < 1.0:
        return "slower"
    return "within noise"
