"""Comparing profiles against a baseline (the tables are rendered by edgesmith.reports.comparison).

A speedup is median(baseline) / median(candidate) with a bootstrap confidence interval
(:mod:`edgesmith.stats`); a verdict claims "faster" or "slower" only when the whole interval lies
on one side of 1.0.

Generation profiles (decoders) compare on what a user of a language model waits for: the decode
speedup is the ratio of median per-token decode latencies (hundreds of raw samples, so a tight
interval), and the time-to-first-token ratio per prompt length both profiles have (one sample per
round: with the default 3 rounds the 95 % interval excludes 1.0 only when every TTFT of one side
beats every TTFT of the other, so a TTFT verdict is conservative). Batched profiles (static batches of
mixed-length prompts, one per batch size) compare across batch sizes: the decode ratio is the
aggregate throughput's (per-step latency / batch; batch 4 at 2.5x batch 1 makes 2.5x the tokens per
second), the TTFT ratio each request's wait for its first token. A generation profile is never
compared with a one-forward-pass profile: the numbers measure different things.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from edgesmith.errors import BadInput
from edgesmith.profiling.measure import MIN_SAMPLES
from edgesmith.profiling.schema import OpTime, Profile, ProfileKind, Shapes
from edgesmith.schema import StrictModel
from edgesmith.stats import CONFIDENCE, Verdict, bootstrap_speedup, verdict_of

#: per-op deltas listed per compared profile (the largest absolute changes)
OP_DELTA_ROWS = 12
#: fewest TTFT samples (rounds) per side for a bootstrap interval; fewer: the ratio of medians, "within noise"
MIN_TTFT_SAMPLES = 3


class OpDelta(StrictModel):
    """One op type's (or, where both graphs have it, one node's) time against the baseline's."""

    key: str
    level: Literal["op_type", "node"]
    baseline_ms: float
    ms: float

    @property
    def delta_ms(self) -> float:
        return self.ms - self.baseline_ms


class EarlyExitSummary(StrictModel):
    """An early-exit row's exits and the latency its calibration predicts next to the measured one."""

    mean_layers: float | None
    total_layers: int
    histogram: dict[str, int]
    expected_histogram: dict[str, int] = Field(default_factory=dict)
    expected_ms: float | None = None
    measured_mean_ms: float

    def sentence(self, label: str) -> str:
        layers = "-" if self.mean_layers is None else f"{self.mean_layers:.2f}"
        expected = "-" if self.expected_ms is None else f"{self.expected_ms:.2f} ms"
        return (f"{label}: {layers} of {self.total_layers} layers on average (exits {self.histogram}); latency "
                f"expected from the calibration histogram {expected}, measured mean {self.measured_mean_ms:.2f} ms")


class RatioCI(StrictModel):
    """A speedup (baseline / this: above 1 is faster) with its bootstrap interval and verdict."""

    speedup: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: Verdict


class GenerationSummary(StrictModel):
    """A generation row's speeds: decode tokens/s, TTFT per prompt length and their ratios to the baseline."""

    new_tokens: int
    decode_tokens_per_s: float = Field(description="median over rounds")
    ttft_ms: dict[str, float] = Field(description="median time to first token per prompt length")
    ttft: dict[str, RatioCI] = Field(description="TTFT speedup against the baseline per prompt length both have")
    peak_rss_mb: float | None = None
    load_s: float


class ComparisonRow(StrictModel):
    label: str
    target: str = "cpu-local"
    kind: ProfileKind = "measured"
    artifact: str
    runtime: str
    provider: str
    shapes: Shapes
    p50: float
    p90: float
    speedup: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: Verdict
    quality: dict[str, float] = Field(default_factory=dict)
    size_mb: float
    op_deltas: list[OpDelta] | None = None
    early_exit: EarlyExitSummary | None = None
    generation: GenerationSummary | None = None


class Comparison(StrictModel):
    """Profiles side by side against a baseline; speedup = median(baseline) / median(this)."""

    baseline: int
    confidence: float = CONFIDENCE
    rows: list[ComparisonRow]

    def quality_metrics(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row.quality))
        return list(seen)

    def to_json(self, indent: int | None = 2) -> str:
        return self.model_dump_json(indent=indent)

    @property
    def is_generation(self) -> bool:
        return any(row.generation is not None for row in self.rows)

    def prompt_lengths(self) -> list[str]:
        """The prompt lengths of a generation comparison, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in self.rows:
            if row.generation is not None:
                seen.update(dict.fromkeys(row.generation.ttft_ms))
        return list(seen)

    # rendering lives in edgesmith.reports.comparison; these delegate to it

    def table(self, title: str | None = "latency comparison", *, compact: bool = True, width: int | None = None):
        """A rich Table (:func:`edgesmith.reports.comparison.table`); ``width``: the terminal's columns."""
        from edgesmith.reports import comparison as render

        return render.table(self, title, compact_columns=compact, width=width)

    def op_delta_table(self, row: ComparisonRow):
        """A rich Table of one row's per-op deltas (:func:`edgesmith.reports.comparison.op_delta_table`)."""
        from edgesmith.reports import comparison as render

        return render.op_delta_table(self, row)

    def markdown(self) -> str:
        """A Markdown table for report.md, every column (:func:`edgesmith.reports.comparison.markdown`)."""
        from edgesmith.reports import comparison as render

        return render.markdown(self)

    def early_exit_lines(self) -> list[str]:
        """One sentence per early-exit row: layers executed, expected vs measured latency."""
        return [row.early_exit.sentence(row.label) for row in self.rows if row.early_exit is not None]


def _baseline_index(profiles: list[Profile], baseline: int | str) -> int:
    if isinstance(baseline, int):
        if not -len(profiles) <= baseline < len(profiles):
            raise BadInput(f"baseline index {baseline} is out of range: there are {len(profiles)} profiles")
        return baseline % len(profiles)
    for key in ("label", "name"):
        hits = [i for i, p in enumerate(profiles)
                if (p.label if key == "label" else p.artifact.name) == baseline]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BadInput(f"baseline '{baseline}' names {len(hits)} profiles; give its index instead")
    labels = ", ".join(repr(p.label) for p in profiles)
    raise BadInput(f"no profile is labelled or named '{baseline}'; labels: {labels}")


def _as_profile(item: Profile | str | Path) -> Profile:
    return item if isinstance(item, Profile) else Profile.load(item)


def compare(profiles: Sequence[Profile | str | Path], baseline: int | str = 0, *, n_boot: int = 2000,
            seed: int = 0) -> Comparison:
    """Put profiles side by side against ``baseline`` (an index, a label or an artifact name).

    A speedup whose bootstrap confidence interval spans 1.0 is "within noise". A profile measured
    at other shapes than the baseline is listed with the verdict "different shapes" and no speedup.
    """
    loaded = [_as_profile(p) for p in profiles]
    if not loaded:
        raise BadInput("nothing to compare: give at least one profile")
    _check_one_kind(loaded)
    base_profile = loaded[_baseline_index(loaded, baseline)]
    loaded = group_by_target(loaded)
    base_index = next(i for i, p in enumerate(loaded) if p is base_profile)
    base = loaded[base_index]
    rows = []
    for i, prof in enumerate(loaded):
        if base.is_generation:
            rows.append(_generation_row(base, prof, is_base=i == base_index, n_boot=n_boot, seed=seed))
            continue
        speedup = low = high = None
        if i != base_index and (prof.is_estimate or base.is_estimate):
            # an estimate is never passed off as a measurement: ratio of medians, verdict "estimate"
            speedup = base.stats.p50 / prof.stats.p50 if prof.shapes == base.shapes else None
            verdict = "estimate"
        elif i == base_index:
            verdict: Verdict = "baseline"
            speedup = 1.0
        elif prof.shapes != base.shapes:
            verdict = "different shapes"
        elif min(len(base.latencies_ms), len(prof.latencies_ms)) < MIN_SAMPLES:
            # too few samples for an interval: report the ratio of medians, claim nothing
            speedup = base.stats.p50 / prof.stats.p50
            verdict = "within noise"
        else:
            speedup, low, high = bootstrap_speedup(base.latencies_ms, prof.latencies_ms, n_boot=n_boot, seed=seed)
            verdict = verdict_of(low, high)
        rows.append(ComparisonRow(
            label=prof.label, target=prof.target, kind=prof.kind, artifact=prof.artifact.name,
            runtime=prof.runtime.name, provider=prof.provider, shapes=prof.shapes, p50=prof.stats.p50,
            p90=prof.stats.p90, speedup=speedup, ci_low=low, ci_high=high, verdict=verdict,
            quality=dict(prof.quality), size_mb=prof.artifact.size_bytes / 1e6,
            op_deltas=op_deltas(base, prof) if i != base_index else None, early_exit=_exit_summary(prof)))
    return Comparison(baseline=base_index, rows=rows)


def _check_one_kind(profiles: list[Profile]) -> None:
    generation = [p.label for p in profiles if p.is_generation]
    if generation and len(generation) != len(profiles):
        other = [p.label for p in profiles if not p.is_generation]
        raise BadInput(f"cannot compare generation profiles ({', '.join(generation)}) with one-forward-pass profiles "
                       f"({', '.join(other)}): they measure different things; compare each kind on its own")


def _ratio(base: list[float], cand: list[float], min_samples: int, n_boot: int, seed: int) -> RatioCI:
    """Speedup median(base) / median(cand) with a bootstrap interval; with fewer than ``min_samples``
    on a side, the ratio of medians alone and "within noise"."""
    if not base or not cand:
        return RatioCI(verdict="different shapes")
    if min(len(base), len(cand)) < min_samples:
        return RatioCI(speedup=float(np.median(base) / np.median(cand)), verdict="within noise")
    speedup, low, high = bootstrap_speedup(base, cand, n_boot=n_boot, seed=seed)
    return RatioCI(speedup=speedup, ci_low=low, ci_high=high, verdict=verdict_of(low, high))


def _same_decode(base: Profile, prof: Profile) -> bool:
    """Decode latencies compare only at the same batch, decode prompt length and number of new tokens."""
    assert base.generation is not None and prof.generation is not None
    return prof.shapes == base.shapes and prof.generation.new_tokens == base.generation.new_tokens


def _batch_sizes(base: Profile, prof: Profile) -> bool:
    """Two batched profiles (static batches of mixed-length prompts) of the same decode, whatever
    their batch sizes: their decode compares as aggregate throughput, their TTFT as each request's."""
    assert base.generation is not None and prof.generation is not None
    return (base.generation.batched is not None and prof.generation.batched is not None
            and base.shapes.seq == prof.shapes.seq and base.generation.new_tokens == prof.generation.new_tokens)


def _aggregate_ms(prof: Profile) -> list[float]:
    """Per-step latencies over the batch: ms per generated token of the whole batch."""
    return [ms / prof.shapes.batch for ms in prof.latencies_ms]


def _generation_row(base: Profile, prof: Profile, *, is_base: bool, n_boot: int, seed: int) -> ComparisonRow:
    gen, base_gen = prof.generation, base.generation
    assert gen is not None and base_gen is not None
    if is_base:
        decode = RatioCI(speedup=1.0, verdict="baseline")
        ttft = {n: RatioCI(speedup=1.0, verdict="baseline") for n in gen.ttft_ms}
    else:
        if _batch_sizes(base, prof):  # batch 4 against batch 1: the aggregate tokens/s ratio
            decode = _ratio(_aggregate_ms(base), _aggregate_ms(prof), MIN_SAMPLES, n_boot, seed)
        elif _same_decode(base, prof):
            decode = _ratio(base.latencies_ms, prof.latencies_ms, MIN_SAMPLES, n_boot, seed)
        else:
            decode = RatioCI(verdict="different shapes")
        same_batch = gen.batch == base_gen.batch or _batch_sizes(base, prof)
        ttft = {n: _ratio(base_gen.ttft_ms[n], v, MIN_TTFT_SAMPLES, n_boot, seed) if same_batch
                else RatioCI(verdict="different shapes") for n, v in gen.ttft_ms.items() if n in base_gen.ttft_ms}
    summary = GenerationSummary(
        new_tokens=gen.new_tokens, decode_tokens_per_s=float(np.median(gen.decode_tokens_per_s)),
        ttft_ms={n: float(np.median(v)) for n, v in gen.ttft_ms.items()}, ttft=ttft, peak_rss_mb=gen.peak_rss_mb,
        load_s=gen.load_s)
    return ComparisonRow(
        label=prof.label, target=prof.target, kind=prof.kind, artifact=prof.artifact.name, runtime=prof.runtime.name,
        provider=prof.provider, shapes=prof.shapes, p50=prof.stats.p50, p90=prof.stats.p90, speedup=decode.speedup,
        ci_low=decode.ci_low, ci_high=decode.ci_high, verdict=decode.verdict, quality=dict(prof.quality),
        size_mb=prof.artifact.size_bytes / 1e6, generation=summary)


def generation_slowdowns(parent: Profile, prof: Profile, *, n_boot: int = 2000, seed: int = 0) -> list[str]:
    """What of a generation profile is slower than its parent's, interval excluding 1.0: decode
    speed, and the TTFT at each prompt length both have. One phrase each; empty when nothing is."""
    if not (parent.is_generation and prof.is_generation):
        raise BadInput(f"generation_slowdowns compares two generation profiles, got {parent.kind} and {prof.kind}")
    row = _generation_row(parent, prof, is_base=False, n_boot=n_boot, seed=seed)
    assert row.generation is not None
    out = []
    if row.verdict == "slower":
        out.append(f"decode {row.generation.decode_tokens_per_s:.1f} tokens/s, {row.speedup:.2f}x "
                   f"[{row.ci_low:.2f}-{row.ci_high:.2f}]")
    for n, ratio in row.generation.ttft.items():
        if ratio.verdict == "slower":
            out.append(f"TTFT at {n} prompt tokens {row.generation.ttft_ms[n]:.1f} ms, {ratio.speedup:.2f}x "
                       f"[{ratio.ci_low:.2f}-{ratio.ci_high:.2f}]")
    return out


def _exit_summary(prof: Profile) -> EarlyExitSummary | None:
    ex = prof.early_exit
    if ex is None:
        return None
    return EarlyExitSummary(mean_layers=ex.mean_layers, total_layers=ex.total_layers, histogram=ex.histogram,
                            expected_histogram=ex.expected_histogram, expected_ms=ex.expected_ms,
                            measured_mean_ms=prof.stats.mean)


def group_by_target(profiles: list[Profile]) -> list[Profile]:
    """Profiles grouped by target (targets in order of first appearance, order kept inside a group)."""
    order = list(dict.fromkeys(p.target for p in profiles))
    return sorted(profiles, key=lambda p: order.index(p.target))


def _op_type_totals(ops: list[OpTime]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for op in ops:
        totals[op.op_type] = totals.get(op.op_type, 0.0) + op.ms
    return totals


def op_deltas(base: Profile, prof: Profile, limit: int = OP_DELTA_ROWS) -> list[OpDelta] | None:
    """Per-op deltas of ``prof`` against ``base`` where both have per-op times (None otherwise).

    Rows per op type (a quantized graph swaps MatMul for MatMulInteger: both show, one at zero);
    then the nodes both graphs share by name, largest absolute changes first, ``limit`` of each.
    """
    if not base.per_op or not prof.per_op:
        return None
    b_types, p_types = _op_type_totals(base.per_op), _op_type_totals(prof.per_op)
    by_type = [OpDelta(key=k, level="op_type", baseline_ms=b_types.get(k, 0.0), ms=p_types.get(k, 0.0))
               for k in dict.fromkeys([*b_types, *p_types])]
    b_nodes = {op.name: op.ms for op in base.per_op}
    by_node = [OpDelta(key=op.name, level="node", baseline_ms=b_nodes[op.name], ms=op.ms)
               for op in prof.per_op if op.name in b_nodes]
    by_type.sort(key=lambda d: -abs(d.delta_ms))
    by_node.sort(key=lambda d: -abs(d.delta_ms))
    return by_type[:limit] + by_node[:limit]
