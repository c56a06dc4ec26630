"""Compression passes, and one function per pass for scripts: ``es.compress.prune(model, ...)``."""

from __future__ import annotations

from typing import Any

from edgesmith.artifacts import Artifact
from edgesmith.compress.base import Context, Pass, PassConfig, available_passes, get_pass, register

__all__ = ["Context", "Pass", "PassConfig", "available_passes", "distill", "get_pass", "prune", "quantize", "register"]


def _apply(name: str, artifact: Artifact, ctx: Context | None, options: dict[str, Any]) -> Artifact:
    return get_pass(name)(**options)(artifact, ctx)


def prune(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """Structured pruning of attention heads and FFN channels (see ``PruneConfig``)."""
    return _apply("prune", model, ctx, options)


def quantize(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """ONNX Runtime INT8 quantization of an ONNX model (see ``QuantizeConfig``)."""
    return _apply("quantize", model, ctx, options)


def distill(model: Artifact, ctx: Context | None = None, **options: Any) -> Artifact:
    """Knowledge distillation from a teacher (default: ``ctx.source``) into ``model`` (see ``DistillConfig``)."""
    return _apply("distill", model, ctx, options)
