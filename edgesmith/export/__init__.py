"""Exporters: ``to_onnx`` (TorchModel -> OnnxModel), ``to_gguf`` (a causal LM -> GgufModel for
llama.cpp) and ``to_tensorrt`` (OnnxModel -> TensorRTEngine), each validated against its source."""

from __future__ import annotations

from typing import Any

from edgesmith.artifacts import Artifact

__all__ = ["to_genai", "to_gguf", "to_onnx", "to_tensorrt"]


def to_onnx(model: Artifact, ctx=None, **options: Any) -> Artifact:
    """Export a TorchModel to ONNX and validate it (see ``ExportConfig``)."""
    from edgesmith.passes import get_pass

    return get_pass("export")(**options)(model, ctx)


def to_genai(model: Artifact, ctx=None, **options: Any) -> Artifact:
    """Export a causal LM as an ORT GenAI folder (``onnxruntime_genai.Model(folder)`` loads it), built
    by ORT GenAI's model builder and validated on prompts of different lengths in one batch, in
    edgesmith's loop and in ORT GenAI (the export pass with ``backend="genai"``)."""
    return to_onnx(model, ctx, **{**options, "backend": "genai"})


def to_tensorrt(model: Artifact, ctx=None, **options: Any) -> Artifact:
    """Build a TensorRT engine from an OnnxModel on this GPU and validate it (see ``TensorRTConfig``)."""
    from edgesmith.passes import get_pass

    return get_pass("tensorrt")(**options)(model, ctx)


def to_gguf(model: Artifact, ctx=None, **options: Any) -> Artifact:
    """Write a causal LM as a GGUF for llama.cpp and validate it (see ``GgufConfig``: ``quant="q4_1"``)."""
    from edgesmith.passes import get_pass

    return get_pass("gguf")(**options)(model, ctx)
