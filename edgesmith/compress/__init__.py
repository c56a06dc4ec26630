"""Compression passes, and one function per pass for scripts: ``es.compress.prune(model, ...)``."""

from __future__ import annotations

from typing import Any

from edgesmith.artifacts import Artifact
from edgesmith.passes import Context, Pass, PassConfig, available_passes, get_pass, register

__all__ = ["Context", "Pass", "PassConfig", "available_passes", "distill", "early_exit", "get_pass", "prune", "quantize", "quantize_gguf", "register"]


def _apply(name: str, artifact: Artifact, ctx: Context | None, options: dict[str, Any]) -> Artifact:
    return get_pass(name)(**options)(artifact, ctx)


def prune(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """Structured pruning of attention heads and FFN channels (see ``PruneConfig``)."""
    return _apply("prune", model, ctx, options)


def quantize(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """Quantize an ONNX model with ONNX Runtime: INT8 dynamic or static (QDQ), or FP16; accuracy-aware with
    ``max_drop`` (see ``QuantizeConfig``)."""
    return _apply("quantize", model, ctx, options)


def quantize_gguf(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """A causal LM into llama.cpp's fast 4-bit formats (Q4_0, IQ4_NL): scale search, GPTQ or
    quantization-aware distillation, written as a GGUF with its verdict (see ``GgufQuantizeConfig``)."""
    return _apply("gguf-quantize", model, ctx, options)


def distill(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """Knowledge distillation from a teacher (default: ``ctx.source``) into ``model`` (see ``DistillConfig``)."""
    return _apply("distill", model, ctx, options)


def early_exit(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """Exit heads, self-distillation, a calibrated exit policy and ONNX segments: an EarlyExitModel
    (see ``EarlyExitConfig``; e.g. ``early_exit(m, data="builtin:wordnet", budget="accuracy=0.01")``)."""
    return _apply("early-exit", model, ctx, options)
