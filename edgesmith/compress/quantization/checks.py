"""Fidelity of a quantized graph to its parent and to the run's source model, and its latency against the parent."""

from __future__ import annotations

from typing import Any

from edgesmith.artifacts import OnnxModel, TorchModel
from edgesmith.compress.quantization.config import FIDELITY_TEXTS, PROBE_POOL
from edgesmith.passes import Context

# ---------------------------------------------------------------------------------------------
# Fidelity to the parent graph
# ---------------------------------------------------------------------------------------------


def measure_fidelity(parent: OnnxModel, quantized: OnnxModel, ctx: Context) -> dict[str, Any]:
    """compare_outputs on probe batches (max/mean abs diff, min cosine of pooled rows), plus mean
    cosine and neighbour recall (encoders) or prediction agreement (classifiers) on corpus texts."""
    from edgesmith.quality import evaluate
    from edgesmith.validation import compare_outputs

    probe = compare_outputs(parent, quantized, texts=ctx.corpus(PROBE_POOL))
    result: dict[str, Any] = {"max_abs": probe["max_abs"], "mean_abs": probe["mean_abs"],
                              "min_cosine": probe["min_cosine"], "probes": len(probe["probes"])}
    texts = ctx.corpus(FIDELITY_TEXTS)
    if len(texts) >= 2 and parent.task in ("feature-extraction", "sequence-classification"):
        k = min(10, len(texts) - 1)
        metrics = evaluate(quantized, parent, texts, k=k)
        result.update({key: round(value, 6) for key, value in metrics.items()})
        result["texts"] = len(texts)
        if "cosine_min" in metrics:
            result["min_cosine"] = min(result["min_cosine"], metrics["cosine_min"])
    return result


def source_fidelity(quantized: OnnxModel, ctx: Context) -> dict[str, Any]:
    """Quality against the run's source model (quality.evaluate), when the context has one that
    runs (a TorchModel or an OnnxModel of the same task); else empty."""
    from edgesmith.quality import evaluate

    source = ctx.source
    if not isinstance(source, (OnnxModel, TorchModel)) or source.task != quantized.task:
        return {}
    if quantized.task not in ("feature-extraction", "sequence-classification"):
        return {}
    texts = ctx.corpus(FIDELITY_TEXTS)
    if len(texts) < 2:
        return {}
    labels = ctx.labels[:len(texts)] if ctx.labels and ctx.texts else None
    metrics = evaluate(quantized, source, texts, labels, k=min(10, len(texts) - 1))
    return {key: round(value, 6) for key, value in metrics.items()} | {"texts": len(texts), "source": source.name}


def speed_against_parent(parent: OnnxModel, quantized: OnnxModel, *, batch: int = 1, seq: int = 128,
                         rounds: int = 4, block: int = 10) -> dict[str, Any]:
    """Latency of parent and result on ONNX Runtime CPU, measured in interleaved blocks (a block
    of iterations per model, alternating order, so neither is favoured by the caches), with the
    bootstrap speedup; ``slower_than_parent`` when the whole interval lies below 1."""
    from edgesmith.profiling import build_feeds, measure
    from edgesmith.runtimes.base import default_runtime_for, get_runtime
    from edgesmith.stats import bootstrap_speedup, summarize, verdict_of

    runtime = get_runtime(default_runtime_for(parent))  # ONNX Runtime for the ONNX models this pass writes
    sessions = {"parent": runtime.load(parent), "quantized": runtime.load(quantized)}
    samples: dict[str, list[float]] = {"parent": [], "quantized": []}
    try:
        feeds = build_feeds(parent.tokenizer, sessions["parent"].input_names, batch=batch, seq=seq)
        for name, session in sessions.items():
            measure(session, feeds, warmup=3, iterations=1)
        for r in range(rounds):
            order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
            for name in order:
                samples[name] += measure(sessions[name], feeds, warmup=1, iterations=block)
    finally:
        for session in sessions.values():
            session.close()
    speedup, low, high = bootstrap_speedup(samples["parent"], samples["quantized"])
    verdict = verdict_of(low, high)
    return {"batch": batch, "seq": seq, "runtime": "onnxruntime cpu",
            "parent_p50_ms": round(summarize(samples["parent"])["p50"], 3),
            "p50_ms": round(summarize(samples["quantized"])["p50"], 3),
            "speedup": round(speedup, 3), "speedup_ci": [round(low, 3), round(high, 3)], "verdict": verdict,
            "slower_than_parent": verdict == "slower"}
