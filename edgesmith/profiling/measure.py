"""Measuring one profile: inputs, the timed loop, device memory, per-op times, and the Profile it makes.

``profile`` loads the artifact on a runtime (:mod:`edgesmith.runtimes`), times real sentences padded
to fixed shapes, and returns a :class:`~edgesmith.profiling.schema.Profile`; ``measure`` is the timed
loop alone, for callers that hold a session already.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from itertools import cycle
from typing import Any

import numpy as np

from edgesmith.artifacts import Artifact, TorchModel
from edgesmith.errors import BadInput
from edgesmith.profiling.agent import peak_host_memory_mb as agent_peak_host_memory_mb
from edgesmith.profiling.environment import Environment, fingerprint
from edgesmith.profiling.schema import ArtifactInfo, EarlyExitStats, OpTime, Profile, RuntimeInfo, Shapes, Stats
from edgesmith.stats import summarize

log = logging.getLogger(__name__)

#: a time budget never stops a profile before this many timed samples
MIN_SAMPLES = 5
#: distinct input batches the timed loop cycles through
INPUT_BATCHES = 4
#: distinct input batches for an early-exit model: its latency depends on the inputs, so one
#: repeated input (or four) would say nothing about the exit mix
EARLY_EXIT_INPUT_BATCHES = 64


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
    """Peak resident memory of this process (VmHWM, read by the device agent's stdlib function), in
    MiB; getrusage's lifetime peak where /proc is not there."""
    hwm = agent_peak_host_memory_mb()
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)


def _reset_device_memory(session) -> None:
    if session.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def _device_memory_mb(session) -> float | None:
    """Peak device memory while profiling: the session's own account (TensorRT: the engine's context
    memory plus its buffers; torch on CUDA: what its allocator holds, weights included); None off the GPU."""
    return session.device_memory_mb()


def _runtime_options(runtime: str, provider: str, threads: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """What the runtime's ``load`` takes: ``provider`` under the option that names its device
    (:attr:`~edgesmith.runtimes.base.Runtime.device_option`: torch's ``device``, ORT's ``provider``)."""
    from edgesmith.runtimes.base import get_runtime

    options = dict(options)
    options["threads"] = threads
    options.setdefault(get_runtime(runtime).device_option, provider)
    return options


def check_arguments(batch: int, seq: int, warmup: int, iterations: int, time_budget_s: float | None) -> None:
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
    return session.time_run if session.times_on_device and session.device.startswith("cuda") else None


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
    session.reset_stats()  # an early-exit session counts exits and segment times: the timed runs only
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

    check_arguments(batch, seq, warmup, iterations, time_budget_s)
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
        session_options = dict(session.options or {})
        device_peak = _device_memory_mb(session)
    finally:
        session.close()
    ops = None
    if per_op:
        ops = [OpTime(**op) for op in get_runtime(runtime_name).per_op(artifact, options, feeds, per_op_runs)]
    used_threads = session_options.get("threads", threads)
    return measured_profile(
        label=label or f"{artifact.name} ({runtime_name})",
        artifact=info,
        runtime=RuntimeInfo(name=runtime_name, providers=providers, options=session_options),
        target=target,
        environment=fingerprint(threads=int(used_threads) if used_threads else None),
        batch=batch,
        seq=seq,
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        latencies=latencies,
        peak_host_memory_mb=peak_host_memory_mb(),
        peak_device_memory_mb=device_peak,
        per_op=ops,
        early_exit=exit_stats,
    )


def measured_profile(*, label: str, artifact: ArtifactInfo, runtime: RuntimeInfo, target: str,
                     environment: Environment, batch: int, seq: int, warmup: int, iterations: int,
                     time_budget_s: float | None, latencies: list[float], peak_host_memory_mb: float | None = None,
                     peak_device_memory_mb: float | None = None, per_op: list[OpTime] | None = None,
                     early_exit: EarlyExitStats | None = None) -> Profile:
    """A measured Profile from raw latencies, here or on a device (:mod:`edgesmith.profiling.remote`):
    the statistics, the throughput (batch / median latency) and the creation time are filled in."""
    stats = Stats(**summarize(latencies))
    return Profile(
        label=label,
        artifact=artifact,
        runtime=runtime,
        target=target,
        environment=environment,
        shapes=Shapes(batch=batch, seq=seq),
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget_s,
        latencies_ms=latencies,
        stats=stats,
        throughput=batch * 1000.0 / stats.p50,
        peak_host_memory_mb=peak_host_memory_mb,
        peak_device_memory_mb=peak_device_memory_mb,
        per_op=per_op,
        early_exit=early_exit,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def early_exit_stats(session, batch: int) -> EarlyExitStats | None:
    """The exit histogram and segment times an early-exit session counted, with the latency its
    calibration histogram predicts from those segment times (None for other sessions)."""
    stats = session.exit_stats()
    if stats is None:
        return None
    layers = stats["exit_layers"]
    policy = session.policy
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
