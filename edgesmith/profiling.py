"""Latency profiles: the versioned Profile document, measuring one, statistics, and comparing many.

A profile records what was measured (the artifact's hash, kind and size), how (runtime, the
providers the session really ran on, its options, threads, shapes, warm-up), where (target and
an environment fingerprint) and every raw per-iteration latency, so that statistics can be
recomputed and two profiles compared with a bootstrap confidence interval instead of a guess.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from itertools import cycle
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.artifacts import Artifact, TorchModel
from edgesmith.environment import Environment, fingerprint
from edgesmith.errors import BadInput
from edgesmith.storage import write_json_atomic

log = logging.getLogger(__name__)

PROFILE_SCHEMA_VERSION = 1
#: a time budget never stops a profile before this many timed samples
MIN_SAMPLES = 5
#: distinct input batches the timed loop cycles through
INPUT_BATCHES = 4
#: distinct input batches for an early-exit model: its latency depends on the inputs, so one
#: repeated input (or four) would say nothing about the exit mix
EARLY_EXIT_INPUT_BATCHES = 64
CONFIDENCE = 0.95

VERDICT_HEADER = "verdict"
#: columns the compact table folds into its title when every row has the same value
COMPACT_DROPPABLE = ("target", "artifact", "runtime", "provider", "shapes")
#: columns the compact table leaves to the JSON and Markdown outputs
COMPACT_HIDDEN = ("artifact", "runtime", "cosine_min")
Verdict = Literal["baseline", "faster", "slower", "within noise", "different shapes", "estimate"]
ProfileKind = Literal["measured", "estimate"]
#: per-op deltas listed per compared profile (the largest absolute changes)
OP_DELTA_ROWS = 12


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArtifactInfo(_Strict):
    name: str
    kind: str
    hash: str
    size_bytes: int = Field(description="bytes on disk; for a TorchModel, the bytes of its parameters and buffers")
    task: str


class RuntimeInfo(_Strict):
    name: str
    providers: list[str] = Field(description="the providers the session really ran on, read back from it")
    options: dict[str, Any] = Field(default_factory=dict)


class Shapes(_Strict):
    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


class Stats(_Strict):
    p50: float
    p90: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    n: int


class OpTime(_Strict):
    """Mean time of one graph node (ONNX Runtime) or engine layer (TensorRT) per run."""

    name: str
    op_type: str
    ms: float
    calls: int = 1
    provider: str | None = None


class RooflineEstimate(_Strict):
    """How an estimate was made: work and weight bytes against a target's published peaks."""

    macs: int
    weight_bytes: int
    precision: str = Field(description="the precision whose peak was used")
    peak_ops_per_s: float
    memory_bandwidth_bytes_per_s: float
    compute_ms: float
    memory_ms: float
    bound: Literal["compute", "memory"]


class EarlyExitStats(_Strict):
    """What an early-exit model did while profiled: samples per exit (layers executed), time per
    segment, and the latency the calibration's exit histogram predicts from those segment times."""

    exit_layers: list[int]
    histogram: dict[str, int] = Field(description="timed samples that left at each exit (key: layers executed)")
    samples: int
    mean_layers: float | None
    total_layers: int
    segment_runs: list[int] = Field(description="times each segment ran during the timed loop")
    segment_rows: list[int] = Field(description="rows each segment processed during the timed loop")
    segment_ms: list[float | None] = Field(description="mean ms per run of each segment (None: never ran)")
    expected_histogram: dict[str, int] = Field(default_factory=dict,
                                               description="the calibration's exit histogram (validation data)")
    expected_ms: float | None = Field(default=None, description=(
        "sum over segments of P(the segment runs) x its mean ms, P from the calibration histogram: "
        "1 - (1 - reach)^batch, reach = share of samples that get to the segment"))


class Profile(_Strict):
    """One latency profile: an artifact on a runtime, on a target, at fixed shapes.

    ``kind`` is "measured" for timed runs and "estimate" for a roofline estimate (then
    ``latencies_ms`` holds the single estimated latency and ``estimate`` says how it was made).
    """

    schema_version: int = PROFILE_SCHEMA_VERSION
    kind: ProfileKind = "measured"
    label: str
    artifact: ArtifactInfo
    runtime: RuntimeInfo
    target: str = "cpu-local"
    environment: Environment
    shapes: Shapes
    warmup: int
    iterations: int = Field(description="timed iterations asked for; stats.n says how many ran")
    time_budget_s: float | None = None
    latencies_ms: list[float] = Field(description="raw wall-clock latency of every timed iteration")
    stats: Stats
    throughput: float = Field(description="samples per second: batch / median latency")
    peak_host_memory_mb: float | None = Field(
        default=None, description="peak resident memory of the whole profiling process (VmHWM), not of the model alone")
    peak_device_memory_mb: float | None = None
    quality: dict[str, float] = Field(default_factory=dict)
    per_op: list[OpTime] | None = Field(default=None, description="per-op (or per-layer) mean ms per run, "
                                        "from a separate profiler session; absent when not asked for")
    estimate: RooflineEstimate | None = None
    early_exit: EarlyExitStats | None = Field(default=None, description="exit histogram and per-segment latency "
                                              "of an early-exit model; absent for other models")
    created: str

    @property
    def is_estimate(self) -> bool:
        return self.kind == "estimate"

    @property
    def provider(self) -> str:
        """The provider the session ran on first (the one that matters)."""
        return self.runtime.providers[0] if self.runtime.providers else "unknown"

    def save(self, path: str | Path) -> Path:
        """Write the profile as JSON, atomically (a temp file renamed into place)."""
        path = Path(path)
        write_json_atomic(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile; a missing, corrupt or foreign file is a :class:`BadInput` naming it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise BadInput(f"profile {path} not found; record one with `edgesmith profile MODEL --out {path}`") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"profile {path}: cannot read it ({exc}); give a profile JSON file") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"profile {path}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                           "the file is damaged, record the profile again") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "profile") -> Profile:
        if not isinstance(data, dict) or "schema_version" not in data:
            raise BadInput(f"{source}: not an edgesmith profile (no schema_version); give a file written by `edgesmith profile`")
        version = data["schema_version"]
        if not isinstance(version, int):
            raise BadInput(f"{source}: schema_version {version!r} is not a number; the file is damaged")
        if version > PROFILE_SCHEMA_VERSION:
            raise BadInput(f"{source}: written by a newer edgesmith (profile schema {version}, this one reads "
                           f"{PROFILE_SCHEMA_VERSION}); upgrade edgesmith")
        if version < 1:
            raise BadInput(f"{source}: unknown profile schema {version}; record the profile again")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise BadInput(f"{source}: not a valid profile ({exc.error_count()} problem(s); first: {where}: "
                           f"{first['msg']}); record the profile again") from exc


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def artifact_size_bytes(artifact: Artifact) -> int:
    """Bytes on disk; for a TorchModel (in memory), the bytes of its parameters and buffers."""
    if isinstance(artifact, TorchModel):
        tensors = list(artifact.module.parameters()) + list(artifact.module.buffers())
        return int(sum(t.numel() * t.element_size() for t in tensors))
    size = getattr(artifact, "size_bytes", None)
    if callable(size):
        return int(size())
    folder = getattr(artifact, "folder", None)
    if folder is not None:
        from edgesmith.storage import folder_size

        return int(folder_size(folder))
    return 0


def artifact_info(artifact: Artifact) -> ArtifactInfo:
    return ArtifactInfo(name=artifact.name, kind=artifact.kind, hash=artifact.content_hash(),
                        size_bytes=artifact_size_bytes(artifact), task=artifact.task)


def build_feeds(tokenizer, input_names: list[str], *, batch: int, seq: int,
                texts: Sequence[str] | None = None, batches: int = INPUT_BATCHES) -> list[dict[str, np.ndarray]]:
    """Up to ``batches`` distinct batches of real sentences, each padded to exactly ``seq``."""
    from edgesmith.data import builtin_corpus
    from edgesmith.inputs import tokenize

    pool = [t for t in (texts if texts is not None else builtin_corpus(limit=batch * batches)) if t]
    if not pool:
        raise BadInput("no texts to build profiling inputs from; give non-empty texts")
    count = max(1, min(batches, len(pool) // batch))
    feeds = []
    for b in range(count):
        rows = [pool[(b * batch + i) % len(pool)] for i in range(batch)]
        feeds.append(tokenize(tokenizer, rows, input_names=input_names, seq=seq))
    return feeds


def peak_host_memory_mb() -> float | None:
    """Peak resident memory of this process (VmHWM), in MiB."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)


def _on_torch_cuda(session) -> bool:
    return session.runtime == "torch" and str(getattr(session, "device", "cpu")).startswith("cuda")


def _reset_device_memory(session) -> None:
    if str(getattr(session, "device", "cpu")).startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def _device_memory_mb(session) -> float | None:
    """Peak device memory while profiling: the session's own account where it keeps one (TensorRT:
    the engine's context memory plus its buffers), else what torch allocated on CUDA (weights
    included); None off the GPU."""
    own = getattr(session, "device_memory_mb", None)
    if callable(own):
        return own()
    if not _on_torch_cuda(session):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _runtime_options(runtime: str, provider: str, threads: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """What the runtime's ``load`` takes: torch names its device ``device``, ORT its ``provider``."""
    options = dict(options)
    options["threads"] = threads
    if runtime == "torch":
        options.setdefault("device", provider)
    else:
        options.setdefault("provider", provider)
    return options


def _check_arguments(batch: int, seq: int, warmup: int, iterations: int, time_budget_s: float | None) -> None:
    if batch < 1 or seq < 1:
        raise BadInput(f"batch and seq must be at least 1 (got batch={batch}, seq={seq})")
    if warmup < 0:
        raise BadInput(f"warmup must be 0 or more (got {warmup})")
    if iterations < 1:
        raise BadInput(f"iterations must be at least 1 (got {iterations})")
    if time_budget_s is not None and time_budget_s <= 0:
        raise BadInput(f"time budget must be positive seconds (got {time_budget_s})")


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)


def _device_timer(session):
    """A GPU session's own timer (CUDA events, inputs on the device), or None: wall-clock timing."""
    timer = getattr(session, "time_run", None)
    return timer if callable(timer) and str(getattr(session, "device", "cpu")).startswith("cuda") else None


def measure(session, feeds: list[dict[str, np.ndarray]], *, warmup: int, iterations: int,
            time_budget_s: float | None = None, progress: bool = False) -> list[float]:
    """Run ``warmup`` untimed runs, then timed runs until ``iterations`` or the time budget (which
    covers the timed runs only) is spent, never fewer than ``MIN_SAMPLES``. Returns milliseconds.

    A session on a CUDA device that has ``time_run`` (torch CUDA, TensorRT, ONNX Runtime's GPU
    providers) is timed by it: CUDA events or IOBinding, inputs already on the device, after
    synchronisation. Others: wall-clock around ``run`` and ``synchronize``."""
    batches = cycle(feeds)
    warm = _device_timer(session) or session.run
    for _ in range(warmup):
        warm(next(batches))
    session.synchronize()
    reset = getattr(session, "reset_stats", None)
    if callable(reset):  # an early-exit session counts exits and segment times: the timed runs only
        reset()
    latencies: list[float] = []
    device_timer = _device_timer(session)
    bar = _progress(progress, iterations)
    task = bar.add_task("profile", total=iterations) if bar else None
    if bar:
        bar.start()
    try:
        started = time.perf_counter()
        for _ in range(iterations):
            feed = next(batches)
            t0 = time.perf_counter()
            if device_timer is not None:
                latencies.append(device_timer(feed))
                t1 = time.perf_counter()
            else:
                session.run(feed)
                session.synchronize()
                t1 = time.perf_counter()
                latencies.append((t1 - t0) * 1000.0)
            if bar:
                bar.advance(task)
            if time_budget_s is not None and t1 - started >= time_budget_s and len(latencies) >= MIN_SAMPLES:
                log.info("time budget of %.1f s spent after %d of %d iterations", time_budget_s, len(latencies), iterations)
                break
    finally:
        if bar:
            bar.stop()
    return latencies


def profile(artifact: Artifact, runtime: str | None = None, *, batch: int = 1, seq: int = 128, warmup: int = 5,
            iterations: int = 50, time_budget_s: float | None = None, threads: int | None = None,
            provider: str = "cpu", target: str = "cpu-local", texts: Sequence[str] | None = None,
            label: str | None = None, progress: bool = False, per_op: bool = False,
            per_op_runs: int = 10, **runtime_options: Any) -> Profile:
    """Measure the latency of ``artifact`` on ``runtime`` (default: the one its kind runs on).

    Inputs are real sentences (the built-in corpus, or ``texts``) padded to exactly ``seq`` tokens.
    The profile records the providers the session reports, never the one asked for. ``per_op``
    (ONNX Runtime, TensorRT) adds per-op (per-layer) times from their profilers, recorded over
    ``per_op_runs`` runs in a second session, so the profiler never slows the timed loop.
    """
    from edgesmith.runtimes.base import default_runtime_for, get_runtime

    _check_arguments(batch, seq, warmup, iterations, time_budget_s)
    runtime_name = runtime or default_runtime_for(artifact)
    options = _runtime_options(runtime_name, provider, threads, runtime_options)
    info = artifact_info(artifact)
    session = get_runtime(runtime_name).load(artifact, **options)
    try:
        _reset_device_memory(session)
        distinct = EARLY_EXIT_INPUT_BATCHES if artifact.kind == "early-exit" else INPUT_BATCHES
        feeds = build_feeds(artifact.tokenizer, session.input_names, batch=batch, seq=seq, texts=texts,
                            batches=distinct)
        latencies = measure(session, feeds, warmup=warmup, iterations=iterations, time_budget_s=time_budget_s,
                            progress=progress)
        exit_stats = early_exit_stats(session, batch)
        providers = list(session.providers)
        session_options = dict(getattr(session, "options", {}) or {})
        device_peak = _device_memory_mb(session)
    finally:
        session.close()
    ops = None
    if per_op:
        if runtime_name == "tensorrt":
            ops = tensorrt_per_layer(artifact, options, feeds, per_op_runs)
        elif runtime_name != "onnxruntime":
            raise BadInput(f"per-op times come from ONNX Runtime's or TensorRT's profiler; runtime '{runtime_name}' "
                           "has none")
        else:
            ops = ort_per_op(artifact, options, feeds, per_op_runs)
    stats = Stats(**summarize(latencies))
    used_threads = session_options.get("threads", threads)
    return Profile(
        label=label or f"{artifact.name} ({runtime_name})",
        artifact=info,
        runtime=RuntimeInfo(name=runtime_name, providers=providers, options=session_options),
        target=target,
        environment=fingerprint(threads=int(used_threads) if used_threads else None),
        shapes=Shapes(batch=batch, seq=seq),
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        latencies_ms=latencies,
        stats=stats,
        throughput=batch * 1000.0 / stats.p50,
        peak_host_memory_mb=peak_host_memory_mb(),
        peak_device_memory_mb=device_peak,
        per_op=ops,
        early_exit=exit_stats,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def early_exit_stats(session, batch: int) -> EarlyExitStats | None:
    """The exit histogram and segment times an early-exit session counted, with the latency its
    calibration histogram predicts from those segment times (None for other sessions)."""
    stats_of = getattr(session, "exit_stats", None)
    if not callable(stats_of):
        return None
    stats = stats_of()
    layers = stats["exit_layers"]
    policy = getattr(session, "policy", None)
    expected_hist = {str(k): int(v) for k, v in ((policy.calibration or {}).get("histogram") or {}).items()} \
        if policy is not None else {}
    expected_ms = None
    counts = [expected_hist.get(str(layer), 0) for layer in layers]
    total = sum(counts)
    if total and all(ms is not None for ms in stats["segment_ms"]):
        left = total
        expected_ms = 0.0
        for count, ms in zip(counts, stats["segment_ms"]):
            reach = left / total
            expected_ms += (1.0 - (1.0 - reach) ** batch) * ms
            left -= count
    return EarlyExitStats(exit_layers=layers, histogram=stats["histogram"], samples=stats["samples"],
                          mean_layers=stats["mean_layers"], total_layers=layers[-1], segment_runs=stats["segment_runs"],
                          segment_rows=stats["segment_rows"], segment_ms=stats["segment_ms"],
                          expected_histogram=expected_hist, expected_ms=expected_ms)


def tensorrt_per_layer(artifact: Artifact, options: dict[str, Any], feeds: list[dict[str, np.ndarray]],
                       runs: int) -> list[OpTime]:
    """Per-layer mean times of a TensorRT engine through TensorRT's IProfiler, in a separate session."""
    from edgesmith.runtimes.base import get_runtime

    session = get_runtime("tensorrt").load(artifact, **options)
    try:
        return [OpTime(**layer) for layer in session.per_layer(feeds, runs)]
    finally:
        session.close()


def ort_per_op(artifact: Artifact, options: dict[str, Any], feeds: list[dict[str, np.ndarray]],
               runs: int) -> list[OpTime]:
    """Per-op mean times from ONNX Runtime's profiler (``enable_profiling``), parsed from its trace."""
    import os
    import tempfile

    from edgesmith.runtimes.agent import per_op_from_trace
    from edgesmith.runtimes.base import get_runtime

    if runs < 1:
        raise BadInput(f"per-op runs must be at least 1 (got {runs})")
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="edgesmith-ortprof-") as folder:
        os.chdir(folder)  # ORT writes its trace into the working directory
        try:
            events = []
            for n in (1, runs):  # a first session absorbs first-run allocations; the second is recorded
                session = get_runtime("onnxruntime").load(artifact, **{**options, "enable_profiling": True})
                for i in range(n):
                    session.run(feeds[i % len(feeds)])
                trace = session.end_profiling()
                session.close()
                events = json.loads(Path(trace).read_text(encoding="utf-8"))
        finally:
            os.chdir(previous)
    return [OpTime(**op) for op in per_op_from_trace(events, runs)]


# ---------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------


class OpDelta(_Strict):
    """One op type's (or, where both graphs have it, one node's) time against the baseline's."""

    key: str
    level: Literal["op_type", "node"]
    baseline_ms: float
    ms: float

    @property
    def delta_ms(self) -> float:
        return self.ms - self.baseline_ms


class EarlyExitSummary(_Strict):
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


class ComparisonRow(_Strict):
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


class Comparison(_Strict):
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

    def _cells(self, row: ComparisonRow) -> list[str]:
        label = f"{row.label} (estimate)" if row.kind == "estimate" else row.label
        provider = "roofline estimate" if row.kind == "estimate" else row.provider.removesuffix("ExecutionProvider")
        return ([label, row.target, row.artifact, row.runtime, provider, str(row.shapes),
                 f"{row.p50:.2f}", f"{row.p90:.2f}", _speedup_text(row), row.verdict]
                + [_quality_text(row.quality.get(m)) for m in self.quality_metrics()]
                + [f"{row.size_mb:.1f}"])

    def _headers(self) -> list[str]:
        return (["label", "target", "artifact", "runtime", "provider", "shapes", "p50 ms", "p90 ms",
                 f"speedup [{self.confidence:.0%} CI]", VERDICT_HEADER] + self.quality_metrics() + ["size MB"])

    def _compact(self) -> tuple[list[str], list[list[str]], list[str]]:
        """Headers and cells without the columns that say the same on every row (named in a note instead)."""
        headers, cells = self._headers(), [self._cells(row) for row in self.rows]
        keep, notes = [], []
        for i, header in enumerate(headers):
            values = {c[i] for c in cells}
            if header in COMPACT_DROPPABLE and len(values) == 1 and len(cells) > 1:
                notes.append(f"{header} {next(iter(values))}")
            elif header not in COMPACT_HIDDEN:
                keep.append(i)
        return [headers[i] for i in keep], [[c[i] for i in keep] for c in cells], notes

    def table(self, title: str | None = "latency comparison", *, compact: bool = True):
        """A rich Table of the rows (verdicts coloured); ``compact`` folds columns equal on every row into the title."""
        from rich.markup import escape
        from rich.table import Table

        if compact:
            headers, rows_cells, notes = self._compact()
        else:
            headers, rows_cells, notes = self._headers(), [self._cells(row) for row in self.rows], []
        if title and notes:
            title = f"{title} ({', '.join(notes)})"
        table = Table(title=title)
        numeric = {"p50 ms", "p90 ms", "size MB", *self.quality_metrics()}
        for header in headers:
            table.add_column(header, justify="right" if header in numeric else "left")
        styles = {"faster": "green", "slower": "red", "baseline": "bold", "within noise": "yellow",
                  "different shapes": "dim", "estimate": "magenta"}
        verdict_column = headers.index(VERDICT_HEADER)
        previous = None
        for row, row_cells in zip(self.rows, rows_cells):
            cells = [escape(c) for c in row_cells]
            cells[verdict_column] = f"[{styles[row.verdict]}]{cells[verdict_column]}[/]"
            table.add_row(*cells, end_section=False)
            if previous is not None and previous != row.target:
                table.rows[-2].end_section = True
            previous = row.target
        return table

    def op_delta_table(self, row: ComparisonRow):
        """A rich Table of one row's per-op deltas against the baseline (largest changes first)."""
        from rich.markup import escape
        from rich.table import Table

        base = self.rows[self.baseline]
        table = Table(title=f"per-op: {escape(row.label)} vs {escape(base.label)} (ms per run)")
        for header in ("op", "level", "baseline ms", "ms", "delta ms"):
            table.add_column(header, justify="left" if header in ("op", "level") else "right")
        for d in row.op_deltas or []:
            colour = "green" if d.delta_ms < 0 else "red" if d.delta_ms > 0 else ""
            delta = f"{d.delta_ms:+.3f}"
            table.add_row(escape(d.key), d.level, f"{d.baseline_ms:.3f}", f"{d.ms:.3f}",
                          f"[{colour}]{delta}[/]" if colour else delta)
        return table

    def markdown(self) -> str:
        """A Markdown table for report.md."""
        headers = self._headers()
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if h in {"p50 ms", "p90 ms", "size MB"} else "---" for h in headers) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in self._cells(row)) + " |")
        exits = self.early_exit_lines()
        if exits:
            lines += [""] + [f"- Early exit, {line}" for line in exits]
        return "\n".join(lines) + "\n"

    def early_exit_lines(self) -> list[str]:
        """One sentence per early-exit row: layers executed, expected vs measured latency."""
        return [row.early_exit.sentence(row.label) for row in self.rows if row.early_exit is not None]


def _speedup_text(row: ComparisonRow) -> str:
    if row.verdict == "baseline":
        return "1.00x"
    if row.speedup is None:
        return "-"
    if row.ci_low is None or row.ci_high is None:
        return f"{row.speedup:.2f}x"
    return f"{row.speedup:.2f}x [{row.ci_low:.2f}-{row.ci_high:.2f}]"


def _quality_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


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
    base_profile = loaded[_baseline_index(loaded, baseline)]
    loaded = group_by_target(loaded)
    base_index = next(i for i, p in enumerate(loaded) if p is base_profile)
    base = loaded[base_index]
    rows = []
    for i, prof in enumerate(loaded):
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
