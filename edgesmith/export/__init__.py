"""Exporters: ``to_onnx`` (TorchModel -> OnnxModel, validated against its source)."""

from __future__ import annotations

from typing import Any

from edgesmith.artifacts import Artifact

__all__ = ["to_onnx"]


def to_onnx(model: Artifact, ctx=None, **options: Any) -> Artifact:
    """Export a TorchModel to ONNX and validate it (see ``ExportConfig``)."""
    from edgesmith.compress.base import get_pass

    return get_pass("export")(**options)(model, ctx)
