"""Roofline estimates: what a target's published peaks say an ONNX model's latency is at best.

Work is counted as multiply-accumulates of the matrix products (MatMul, Gemm and their quantized
and fused forms) at the given batch and sequence length, from ONNX shape inference; bytes are the
weights (initializers) read once per run. The estimate is ``max(2·MACs / peak ops, weight bytes /
memory bandwidth)``: a lower bound that ignores activations, element-wise ops, kernel efficiency
and launch overheads. A profile made from it has ``kind="estimate"`` and is labelled so everywhere.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from pathlib import Path

from edgesmith.artifacts import Artifact, OnnxModel
from edgesmith.errors import BadInput

log = logging.getLogger(__name__)

MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul",
              "MatMulIntegerToFloat", "Gemm", "QGemm", "MatMulNBits"}


def _dims(value_info) -> list[int] | None:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return dims


def _concrete(model, batch: int, seq: int):
    """The graph with its token inputs fixed to (batch, seq), shapes inferred."""
    import onnx

    weights = {init.name for init in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        dims = inp.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if not d.HasField("dim_value"):
                d.dim_value = batch if i == 0 else seq
    try:
        # ONNX Runtime's symbolic inference knows its contrib ops and the exporters' patterns
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as exc:  # ImportError without onnxruntime, or a graph it cannot follow
        log.info("symbolic shape inference failed (%s); trying onnx's", exc)
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises several types on graphs it cannot infer
        log.info("shape inference failed (%s); counting weight matmuls only", exc)
        return model


def _node_macs(node, shapes: dict[str, list[int]], tokens: int, seq: int) -> int:
    a_name, b_name = node.input[0], node.input[1]
    if node.op_type == "MatMulNBits":  # B is packed in blocks: K and N are attributes
        attrs = {at.name: at.i for at in node.attribute}
        a = shapes.get(a_name)
        rows = math.prod(a[:-1]) if a else tokens
        return rows * attrs.get("K", 0) * attrs.get("N", 0)
    if node.op_type == "QLinearMatMul":
        a_name, b_name = node.input[0], node.input[3]
    a, b = shapes.get(a_name), shapes.get(b_name)
    if node.op_type in ("Gemm", "QGemm") and a and b and len(a) == 2 and len(b) == 2:
        attrs = {at.name: at.i for at in node.attribute}
        m = a[1] if attrs.get("transA") else a[0]
        k = a[0] if attrs.get("transA") else a[1]
        n = b[0] if attrs.get("transB") else b[1]
        return m * k * n
    if a and b and len(a) >= 1 and len(b) >= 2:
        k, n = b[-2], b[-1]
        batch_dims = a[:-1] if len(b) == 2 else [max(x, y) for x, y in zip(a[:-2], b[:-2])] + [a[-2]]
        return math.prod(batch_dims) * k * n
    if b and len(b) == 2:  # activations of unknown shape times a weight: one product per token
        return tokens * b[0] * b[1]
    if b and len(b) >= 3:  # activation x activation (attention), rows unknown: one row per position
        return math.prod(b[:-2]) * seq * b[-2] * b[-1]
    return 0


def graph_work(path: str | Path, batch: int, seq: int) -> tuple[int, int]:
    """(MACs of the matrix products, bytes of the weights) of the ONNX graph at (batch, seq)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    weight_bytes = 0
    shapes: dict[str, list[int]] = {}
    for init in model.graph.initializer:
        numel = math.prod(init.dims) if init.dims else 1
        weight_bytes += numel * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        shapes[init.name] = list(init.dims)
    inferred = _concrete(model, batch, seq)
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = _dims(vi)
        if dims is not None:
            shapes.setdefault(vi.name, dims)
    macs = sum(_node_macs(node, shapes, batch * seq, seq) for node in inferred.graph.node if node.op_type in MATMUL_OPS)
    return int(macs), int(weight_bytes)


def estimate(artifact: Artifact, target, *, batch: int = 1, seq: int = 128, precision: str | None = None,
             label: str | None = None):
    """A roofline estimate of ``artifact`` on ``target`` as a Profile with ``kind="estimate"``."""
    from edgesmith.profiling.environment import Environment
    from edgesmith.profiling.measure import artifact_info
    from edgesmith.profiling.schema import PROFILE_SCHEMA_VERSION, Profile, RooflineEstimate, RuntimeInfo, Shapes, Stats

    if not isinstance(artifact, OnnxModel):
        raise BadInput("a roofline estimate reads an ONNX graph; export the model first (edgesmith export MODEL)")
    if target.peak is None:
        raise BadInput(f"target {target.name} has no published peak figures (peak: in its YAML); "
                       "measure on it instead, or estimate on a target that has them")
    if batch < 1 or seq < 1:
        raise BadInput(f"batch and seq must be at least 1 (got batch={batch}, seq={seq})")
    precision = precision or str(artifact.meta.get("precision", "fp32"))
    macs, weight_bytes = graph_work(artifact.path, batch, seq)
    peak_ops, used = target.peak.compute(precision)
    bandwidth = target.peak.memory_bandwidth_gbs * 1e9
    compute_ms = 2.0 * macs / peak_ops * 1000.0
    memory_ms = weight_bytes / bandwidth * 1000.0
    ms = max(compute_ms, memory_ms)
    if ms <= 0:
        raise BadInput(f"{artifact.path}: found no matrix products or weights to estimate from")
    info = RooflineEstimate(macs=macs, weight_bytes=weight_bytes, precision=used, peak_ops_per_s=peak_ops,
                            memory_bandwidth_bytes_per_s=bandwidth, compute_ms=compute_ms, memory_ms=memory_ms,
                            bound="compute" if compute_ms >= memory_ms else "memory")
    env = Environment(cpu_model=target.description or target.name, cores=None, threads=target.threads,
                      os="(not measured: roofline estimate)", kernel="", machine="", python="",
                      libraries={}, host=target.host)
    return Profile(
        schema_version=PROFILE_SCHEMA_VERSION,
        kind="estimate",
        label=label or f"{artifact.name} (estimate on {target.name})",
        artifact=artifact_info(artifact),
        runtime=RuntimeInfo(name=target.runtime, providers=["roofline-estimate"],
                            options={"provider": target.provider, "precision": used}),
        target=target.name,
        environment=env,
        shapes=Shapes(batch=batch, seq=seq),
        warmup=0,
        iterations=1,
        latencies_ms=[ms],
        stats=Stats(p50=ms, p90=ms, p99=ms, mean=ms, std=0.0, min=ms, max=ms, n=1),
        throughput=batch * 1000.0 / ms,
        estimate=info,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
