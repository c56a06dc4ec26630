"""INT8 quantization of ONNX graphs with ONNX Runtime's quantizer, checked against the parent graph.

Dynamic mode (``onnxruntime.quantization.quantize_dynamic``): weights are stored as 8-bit
integers (per output channel by default), activations are quantized on the fly at run time
(``DynamicQuantizeLinear`` -> ``MatMulInteger``). No calibration data is needed. The config is a
tagged ``mode`` so that static (calibrated QDQ) and fp16 modes can join it.

The result is measured against its parent graph on the run's texts: a quantized graph whose pooled
outputs fall below ``min_cosine`` is refused (:class:`ValidationFailed`, exit 3), so a broken graph
never passes silently. What was quantized, what stayed in float, sizes and fidelity land in the
lineage report.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from edgesmith.artifacts import META_FILE, ONNX_FILE, Artifact, OnnxModel
from edgesmith.compress.base import Context, Pass, PassConfig, register
from edgesmith.errors import BadInput, ValidationFailed

log = logging.getLogger(__name__)

#: op types that carry weights and that ORT's dynamic (IntegerOps) quantizer handles. Gemm is
#: rewritten to MatMul + Add by the dynamic quantizer and quantized as a MatMul; Gather (embedding
#: tables) is chosen with ``quantize_embeddings`` rather than listed here.
DYNAMIC_WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Attention", "LSTM", "EmbedLayerNormalization")
#: which input of each op type holds its weight
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Attention": 1, "LSTM": 1, "Gather": 0,
                "EmbedLayerNormalization": 2}
#: texts embedded by both graphs for the mean-cosine and neighbour-recall part of the report
FIDELITY_TEXTS = 64
#: sentences the probe batches of ``compare_outputs`` are drawn from
PROBE_POOL = 256


def dynamic_supported_ops() -> list[str]:
    """Op types the installed onnxruntime's dynamic quantizer can quantize (Gather aside)."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    return [op for op in DYNAMIC_WEIGHT_OPS if op in IntegerOpsRegistry or op == "Gemm"]


class QuantizeConfig(PassConfig):
    """How to quantize. ``mode`` selects the method; only ``dynamic`` exists so far.

    - ``per_channel``: one scale per output channel of each weight (per-tensor loses noticeably
      more: MiniLM cosine 0.963 per-tensor vs 0.993 per-channel).
    - ``op_types``: weight op types to quantize (MatMul, Gemm, Conv, Attention, LSTM,
      EmbedLayerNormalization).
    - ``quantize_embeddings``: also store the embedding tables (Gather) as 8-bit.
    - ``reduce_range``: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate.
    - ``weight_type``: ``int8`` (signed, symmetric) or ``uint8``.
    - ``min_cosine``: the quantized graph's pooled outputs must keep this cosine to the parent's.
    """

    mode: Literal["dynamic"] = "dynamic"
    per_channel: bool = True
    op_types: list[str] = ["MatMul", "Gemm"]
    quantize_embeddings: bool = False
    reduce_range: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    min_cosine: float = 0.95

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one op type, e.g. ['MatMul', 'Gemm']")
        supported = dynamic_supported_ops()
        for op in value:
            if op == "Gather":
                raise ValueError("embedding tables (Gather) are chosen with quantize_embeddings: true")
            if op not in supported:
                raise ValueError(f"'{op}' is not an op type ONNX Runtime's dynamic quantizer handles; "
                                 f"use some of: {', '.join(supported)}")
        return list(dict.fromkeys(value))

    @field_validator("min_cosine")
    @classmethod
    def _cosine_range(cls, value: float) -> float:
        if not -1.0 <= value <= 1.0:
            raise ValueError("a cosine lies between -1 and 1")
        return value

    @property
    def target_ops(self) -> list[str]:
        return self.op_types + (["Gather"] if self.quantize_embeddings else [])

    @property
    def precision(self) -> str:
        return f"{self.weight_type}-{self.mode}"


@register
class QuantizePass(Pass):
    """OnnxModel -> OnnxModel with 8-bit weights (ONNX Runtime dynamic quantization)."""

    name = "quantize"
    config_class = QuantizeConfig
    accepts = (OnnxModel,)
    returns = OnnxModel
    description = "INT8 quantization with ONNX Runtime (dynamic: int8 weights, activations at run time)"

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        assert isinstance(artifact, OnnxModel)
        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        folder = ctx.scratch("quantize")
        try:
            quantized, report = quantize_folder(artifact, folder, cfg)
            report["fidelity"] = measure_fidelity(artifact, quantized, ctx)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        ctx.report.update(report)
        worst = report["fidelity"]["min_cosine"]
        if not worst >= cfg.min_cosine:
            shutil.rmtree(folder, ignore_errors=True)
            raise ValidationFailed(
                f"quantize of {artifact.name}: min cosine to the parent graph {worst:.4f} < min_cosine "
                f"{cfg.min_cosine:g} ({report['fidelity'].get('max_abs', float('nan')):.3g} max abs diff); "
                + ("try per_channel: true or fewer op_types" if not cfg.per_channel else "try fewer op_types")
                + ", or check the parent graph")
        log.info("quantized %s: %.1f MB -> %.1f MB, %d nodes int8, min cosine %.4f", artifact.name,
                 report["size_before"] / 1e6, report["size_after"] / 1e6,
                 sum(report["quantized"]["count"].values()), worst)
        return quantized


# ---------------------------------------------------------------------------------------------
# Quantizing
# ---------------------------------------------------------------------------------------------


def quantize_folder(parent: OnnxModel, folder: Path, cfg: QuantizeConfig) -> tuple[OnnxModel, dict[str, Any]]:
    """Write the quantized graph and the parent's companion files into ``folder``."""
    import onnx

    model = onnx.load(str(parent.path))
    name_nodes(model.graph)
    before = weight_nodes(model.graph)
    ops, exclude = ort_op_selection(model.graph, cfg.target_ops)
    started = time.perf_counter()
    run_quantize_dynamic(model, folder / ONNX_FILE, cfg, ops, exclude)
    seconds = time.perf_counter() - started
    copy_companions(parent.folder, folder)
    meta = {**copy.deepcopy(parent.meta), "precision": cfg.precision,
            "quantization": {"mode": cfg.mode, "per_channel": cfg.per_channel, "weight_type": cfg.weight_type,
                             "reduce_range": cfg.reduce_range, "op_types": cfg.target_ops}}
    quantized = OnnxModel(task=parent.task, name=parent.name, lineage=copy.deepcopy(parent.lineage),
                          meta=meta, folder=folder)
    after = onnx.load(str(quantized.path), load_external_data=False).graph
    split = classify_nodes(before, after)
    if not split["quantized"]:
        raise BadInput(f"quantize of {parent.name}: no node of op types {', '.join(cfg.target_ops)} has float "
                       "constant weights to quantize (is the graph already quantized?)")
    report = {
        "size_before": parent.size_bytes(),
        "size_after": quantized.size_bytes(),
        "precision": cfg.precision,
        "per_channel": cfg.per_channel,
        "quantize_seconds": round(seconds, 3),
        "quantized": {"count": dict(Counter(split["quantized"].values())), "nodes": names_by_op(split["quantized"])},
        "float": {"count": dict(Counter(split["float"].values()))},
    }
    return quantized, report


def names_by_op(nodes: dict[str, str]) -> dict[str, list[str]]:
    """{op type: sorted node names} from {node name: op type}."""
    grouped: dict[str, list[str]] = {}
    for name, op in sorted(nodes.items()):
        grouped.setdefault(op, []).append(name)
    return grouped


def name_nodes(graph) -> None:
    """Give every unnamed node a unique name (the quantizer selects and reports nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)


def ort_op_selection(graph, target_ops: list[str]) -> tuple[list[str], list[str]]:
    """ORT's op list and the nodes to exclude so that exactly ``target_ops`` are quantized.

    The dynamic quantizer rewrites every Gemm (alpha = beta = 1, no transA) into ``<name>_MatMul``
    + Add and quantizes it as a MatMul: MatMul and Gemm are told apart by node name.
    """
    ops = [op for op in target_ops if op != "Gemm"]
    exclude: list[str] = []
    if "Gemm" in target_ops and "MatMul" not in ops:
        ops.append("MatMul")
        exclude += [n.name for n in graph.node if n.op_type == "MatMul"]
    if "Gemm" not in target_ops and "MatMul" in ops:
        exclude += [f"{n.name}_MatMul" for n in graph.node if n.op_type == "Gemm"]
    return ops, exclude


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Hide the quantizer's advice to run pre-processing (logged on the root logger each call)."""

    def drop(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def run_quantize_dynamic(model, output: Path, cfg: QuantizeConfig, ops: list[str], exclude: list[str]) -> None:
    """``quantize_dynamic`` from an in-memory model, so that nothing is written beside the input
    (given a path, the quantizer writes a shape-inferred copy next to it)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[cfg.weight_type]
    # without DefaultTensorType the quantizer fails on graphs whose shape inference leaves some
    # tensors untyped ("Unable to find data type for weight_name=...")
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    try:
        with quiet_quantizer():
            quantize_dynamic(model, output, op_types_to_quantize=ops, per_channel=cfg.per_channel,
                             reduce_range=cfg.reduce_range, weight_type=weight_type,
                             nodes_to_exclude=exclude, extra_options=extra)
    except Exception as exc:  # the quantizer raises bare Exceptions and ValueErrors alike
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInput(f"ONNX Runtime's quantizer cannot quantize this graph ({reason}); "
                       "try fewer op_types or per_channel: false") from exc


def copy_companions(source: Path, target: Path) -> None:
    """Tokenizer, config and other files of the input folder; not its graph or edgesmith.json."""
    for f in source.iterdir():
        graph_file = f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data")
        if f.is_file() and not graph_file and f.name != META_FILE:
            shutil.copy2(f, target / f.name)


def _weight_is_8bit(graph, node) -> bool:
    import onnx

    index = WEIGHT_INPUT.get(node.op_type)
    if index is None or len(node.input) <= index:
        return False
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return any(init.name == node.input[index] and init.data_type in eight_bit for init in graph.initializer)


def weight_nodes(graph) -> dict[str, str]:
    """The graph's weight nodes (name -> op type): nodes of a quantizable kind whose weight input
    is a stored tensor (not activation x activation products, not indexing of activations)."""
    stored = {init.name for init in graph.initializer}
    nodes = {}
    for node in graph.node:
        index = WEIGHT_INPUT.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in stored:
            nodes[node.name] = node.op_type
    return nodes


def classify_nodes(before: dict[str, str], after) -> dict[str, dict[str, str]]:
    """Split the parent's weight nodes (name -> op type) into quantized and left in float.

    A node stayed in float when the quantized graph still has it (a Gemm: its ``_MatMul``
    rewrite) under its name and op type, with a weight that is not 8-bit.
    """
    still = {n.name: n for n in after.node}
    split: dict[str, dict[str, str]] = {"quantized": {}, "float": {}}
    for name, op in before.items():
        node = still.get(name) if op != "Gemm" else (still.get(name) or still.get(f"{name}_MatMul"))
        is_float = node is not None and node.op_type in (op, "MatMul") and not _weight_is_8bit(after, node)
        split["float" if is_float else "quantized"][name] = op
    return split


# ---------------------------------------------------------------------------------------------
# Fidelity to the parent graph
# ---------------------------------------------------------------------------------------------


def measure_fidelity(parent: OnnxModel, quantized: OnnxModel, ctx: Context) -> dict[str, Any]:
    """compare_outputs on probe batches (max/mean abs diff, min cosine of pooled rows), plus mean
    cosine and neighbour recall (encoders) or prediction agreement (classifiers) on corpus texts."""
    from edgesmith.quality import evaluate
    from edgesmith.export.onnx import compare_outputs

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
