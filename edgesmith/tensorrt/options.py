"""The tensorrt pass's options, its precisions and their validation tolerances, and the checks a
graph must pass for a precision (int8 and fp8 need a Q/DQ graph; fp8 an FP8-capable GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edgesmith.errors import BadInput
from edgesmith.passes import PassConfig
from edgesmith.tensorrt.precision import Typing
from edgesmith.tensorrt.precision import builder_flags as typed_builder_flags
from edgesmith.tensorrt.shapes import parse_profiles

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
Precision = Literal["fp32", "fp16", "bf16", "int8", "fp8"]
#: FP8 tensor cores: Ada (8.9) and Hopper (9.0) onwards
FP8_MIN_CAPABILITY = (8, 9)
#: default validation tolerances per precision (max abs diff on non-padded positions, min cosine)
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-3, 0.9999), "fp16": (0.05, 0.999),
                                              "bf16": (0.5, 0.995), "int8": (2.0, 0.98), "fp8": (2.0, 0.98)}
DEFAULT_SHAPES = "batch=1:1:32,seq=8:128:256"


class TensorRTConfig(PassConfig):
    """How to build the engine and how close it must stay to its ONNX model.

    ``shapes``: one spec per optimization profile (see :func:`parse_shapes`). ``atol`` and
    ``min_cosine`` default per precision (:data:`TOLERANCES`).
    """

    precision: Precision = "fp16"
    shapes: list[str] = Field(default_factory=lambda: [DEFAULT_SHAPES])
    workspace_mib: int = Field(4096, gt=0)
    optimization_level: int = Field(3, ge=0, le=5)
    tf32: bool = False
    timing_cache: bool = True
    backend: Literal["auto", "python", "trtexec"] = "auto"
    trtexec: str = "trtexec"
    atol: float | None = Field(None, gt=0)
    min_cosine: float | None = Field(None, gt=-1, le=1)

    @field_validator("shapes")
    @classmethod
    def _shapes_parse(cls, value: list[str]) -> list[str]:
        try:
            profiles = parse_profiles(value)
        except BadInput as exc:
            raise ValueError(str(exc)) from exc
        return [",".join(f"{d}={r}" for d, r in p.items()) for p in profiles]


def builder_flags(precision: str, tf32: bool = False, typing: Typing = "weak") -> tuple[list[str], list[str]]:
    """(BuilderFlag names to set, to clear) for a precision under ``typing`` (see
    :func:`edgesmith.tensorrt.precision.builder_flags`)."""
    return typed_builder_flags(precision, typing, tf32)


def quantize_types(onnx_path: str | Path) -> set[str]:
    """Element types the graph's QuantizeLinear nodes produce (from their zero points), e.g. {"INT8"}."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    found = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        zero = node.input[2] if len(node.input) > 2 and node.input[2] else None
        dtype = onnx.TensorProto.UINT8  # ONNX default without a zero point
        if zero in inits:
            dtype = inits[zero].data_type
        elif zero in consts:
            dtype = next((a.t.data_type for a in consts[zero].attribute if a.name == "value"), dtype)
        output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype" and a.i), None)
        found.add(onnx.TensorProto.DataType.Name(output_dtype or dtype))
    return found


def check_precision(precision: str, onnx_path: str | Path, capability: str | None) -> None:
    """int8 needs an explicit Q/DQ graph, fp8 an FP8 Q/DQ graph and an FP8-capable GPU."""
    if precision not in ("int8", "fp8"):
        return
    types = quantize_types(onnx_path)
    if precision == "int8" and not types & {"INT8", "UINT8"}:
        raise BadInput("precision int8 needs an explicitly quantized (Q/DQ) graph: run the quantize pass with "
                       "static QDQ quantization first (TensorRT 10 builds INT8 only from Q/DQ nodes)")
    if precision == "fp8":
        if not any(t.startswith("FLOAT8") for t in types):
            raise BadInput("precision fp8 needs an FP8 Q/DQ graph (NVIDIA Model Optimizer's ONNX output: "
                           "pip install nvidia-modelopt); this graph has none")
        if capability is not None:
            major, _, minor = capability.partition(".")
            if (int(major), int(minor or 0)) < FP8_MIN_CAPABILITY:
                raise BadInput(f"precision fp8 needs compute capability 8.9 or newer (Ada, Hopper); this GPU is "
                               f"{capability}; use fp16 or int8")


def tolerances(cfg: TensorRTConfig) -> tuple[float, float]:
    atol, cosine = TOLERANCES[cfg.precision]
    return (cfg.atol if cfg.atol is not None else atol, cfg.min_cosine if cfg.min_cosine is not None else cosine)
