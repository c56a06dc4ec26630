"""Quantization of ONNX graphs with ONNX Runtime's tooling, checked against the parent and the source.

Modes (``mode``):

- ``dynamic`` (``quantize_dynamic``): int8 weights (per output channel by default), activations
  quantized at run time. No calibration. Embedding tables optionally 8-bit too.
- ``static`` (``quantize_static``, QDQ): activations quantized with ranges calibrated on texts
  (minmax, entropy or percentile) read lazily from a file in bounded memory
  (:mod:`edgesmith.compress.quantization.calibration`). Transformer defaults: only weight MatMuls/Gemms are
  quantized; activation x activation MatMuls (attention scores), LayerNorm, Softmax and GELU stay
  float unless asked (``activation_matmuls``, ``extra_op_types``); and the FFN down-projections
  (weight MatMuls fed by a GELU/ReLU output, whose long-tailed inputs one 8-bit scale cannot
  cover) stay float (``ffn_down_float``). ORT's default op set takes MiniLM to cosine 0.38, weight
  MatMuls only to 0.94, with the FFN down-projections float to 0.99 (FIELD-NOTES).
- ``fp16``: FP16 weights and compute for GPU targets; graph inputs/outputs and sensitive op
  types stay FP32 (:mod:`edgesmith.onnx_graph.fp16`).

``optimize`` first runs ONNX Runtime's transformer optimizer with the artifact's real head count
and hidden size (:mod:`edgesmith.onnx_graph.optimize`) and validates the optimized graph
against its input. ``max_drop`` turns on the accuracy-aware search
(:mod:`edgesmith.compress.quantization.fallback`): the fewest weight nodes go back to float until the gate
holds, or :class:`GateFailed` (exit 3).

Every result is measured against its parent graph on the run's texts: below ``min_cosine`` it is
refused (:class:`ValidationFailed`, exit 3). The report (lineage and run report) holds sizes, the
nodes quantized and left in float (and why), fidelity against the parent and against the run's
source model, and, with ``speed_check``, latency against the parent with a ``slower_than_parent``
flag.

The package: :mod:`~edgesmith.compress.quantization.config` (the options),
:mod:`~edgesmith.compress.quantization.int8` (ORT's dynamic and static quantizers, the accuracy-aware
search), :mod:`~edgesmith.compress.quantization.checks` (fidelity and speed of the result); the ONNX
node utilities are :mod:`edgesmith.onnx_graph.nodes`.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from edgesmith.artifacts import ONNX_FILE, Artifact, OnnxModel, copy_companions
from edgesmith.compress.quantization.checks import measure_fidelity, source_fidelity, speed_against_parent
from edgesmith.compress.quantization.config import (
    DYNAMIC_WEIGHT_OPS,
    FIDELITY_TEXTS,
    OPTIMIZE_ATOL,
    OPTIMIZE_MIN_COSINE,
    PROBE_POOL,
    STATIC_WEIGHT_OPS,
    WEIGHT_ONLY_MODES,
    QuantizeConfig,
    dynamic_supported_ops,
)
from edgesmith.compress.quantization.int8 import write_int8
from edgesmith.errors import BadInput, ValidationFailed
from edgesmith.onnx_graph.nodes import name_nodes
from edgesmith.passes import Context, Pass, make_config, register

log = logging.getLogger(__name__)

#: texts the shapes of ``softmax_floor: auto`` are built from (the run's, else the shipped corpus)
SOFTMAX_TEXTS = 64

__all__ = ["DYNAMIC_WEIGHT_OPS", "FIDELITY_TEXTS", "PROBE_POOL", "STATIC_WEIGHT_OPS", "QuantizeConfig",
           "QuantizePass", "dynamic_supported_ops"]


@register
class QuantizePass(Pass):
    """OnnxModel -> OnnxModel: INT8 (dynamic or static QDQ) or FP16, with ONNX Runtime's tooling."""

    name = "quantize"
    config_class = QuantizeConfig
    accepts = (OnnxModel,)
    returns = OnnxModel
    description = "quantize with ONNX Runtime: INT8 dynamic / static QDQ (calibrated), or FP16; accuracy-aware"
    uses = frozenset({"data", "source"})

    def apply(self, artifact: Artifact, ctx: Context) -> Artifact:
        assert isinstance(artifact, OnnxModel)
        cfg: QuantizeConfig = self.config  # type: ignore[assignment]
        if cfg.mode in WEIGHT_ONLY_MODES:  # MatMulNBits, measured by KL divergence for decoders
            from edgesmith.compress.quantization.weight_only import WeightOnlyConfig, quantize_weight_only

            if artifact.task != "text-generation":
                raise BadInput(f"pass 'quantize': mode {cfg.mode} is weight-only quantization for decoders (causal "
                               f"LMs); {artifact.name} is a {artifact.task} model: use mode dynamic or static")
            try:
                options = cfg.weight_only(artifact)
            except ValueError as exc:
                raise BadInput(f"pass 'quantize': {exc}") from exc
            return quantize_weight_only(artifact, make_config(WeightOnlyConfig, options, where="pass 'quantize'"), ctx)
        folder = ctx.scratch("quantize")
        try:
            quantized, report = build(artifact, folder, cfg, ctx)
            report["fidelity"] = measure_fidelity(artifact, quantized, ctx)
            source = source_fidelity(quantized, ctx)
            if source:
                report["fidelity_vs_source"] = source
            if cfg.speed_check:
                report["speed"] = speed_against_parent(artifact, quantized)
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
                + advice(cfg) + ", or check the parent graph")
        log.info("quantized %s (%s): %.1f MB -> %.1f MB, min cosine %.4f", artifact.name, cfg.precision,
                 report["size_before"] / 1e6, report["size_after"] / 1e6, worst)
        return quantized


def advice(cfg: QuantizeConfig) -> str:
    if cfg.mode == "fp16":
        return "keep more op types in FP32 (fp16_float_ops)"
    if not cfg.per_channel:
        return "try per_channel: true or fewer op_types"
    if cfg.mode == "static":
        return "try a gate (max_drop) to return the sensitive nodes to float, or mode: dynamic"
    return "try fewer op_types or a gate (max_drop)"


# ---------------------------------------------------------------------------------------------
# Quantizing
# ---------------------------------------------------------------------------------------------


def build(parent: OnnxModel, folder: Path, cfg: QuantizeConfig, ctx: Context) -> tuple[OnnxModel, dict[str, Any]]:
    """Optimize (optionally), quantize or convert, and write the result with the parent's companion
    files into ``folder``. Returns the new artifact and the report of what was done."""
    import onnx

    started = time.perf_counter()
    report: dict[str, Any] = {"mode": cfg.mode, "precision": cfg.precision, "size_before": parent.size_bytes()}
    work = ctx.scratch("quantize-work")
    try:
        base = parent
        if cfg.optimize:
            base, report["optimize"] = optimize_and_validate(parent, work / "optimized", ctx, cfg.fusions)
        model = onnx.load(str(base.path))
        name_nodes(model.graph)
        if cfg.mode == "fp16":
            report.update(write_fp16(model, folder / ONNX_FILE, cfg))
        else:
            report.update(write_int8(base, model, folder / ONNX_FILE, cfg, ctx, work))
        floor = cfg.softmax_floor
        if floor == "auto":  # measured here: the floor only where it is faster on this machine
            from edgesmith.compress.quantization.softmax_choice import choose_softmax_floor
            from edgesmith.onnx_graph.softmax import SOFTMAX_FLOOR

            choice = choose_softmax_floor(folder / ONNX_FILE, parent, ctx.corpus(SOFTMAX_TEXTS), work,
                                          floor=SOFTMAX_FLOOR)
            report["softmax_floor_choice"] = choice
            floor = choice["floor"]
        if not cfg.keep_node_metadata or floor is not None:
            report.update(finish_graph(folder / ONNX_FILE, cfg, floor))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    copy_companions(parent.folder, folder)
    meta = {**copy.deepcopy(parent.meta), "precision": cfg.precision,
            "quantization": quantization_meta(cfg, floor, report.get("softmax_floor_choice"))}
    quantized = OnnxModel(task=parent.task, name=parent.name, lineage=copy.deepcopy(parent.lineage),
                          meta=meta, folder=folder)
    report["size_after"] = quantized.size_bytes()
    report["size_ratio"] = round(report["size_after"] / max(report["size_before"], 1), 4)
    report["per_channel"] = cfg.per_channel
    report["quantize_seconds"] = round(time.perf_counter() - started, 3)
    return quantized, report


def finish_graph(path: Path, cfg: QuantizeConfig, floor: float | None) -> dict[str, Any]:
    """Rewrite the ONNX file at ``path``: Softmax inputs floored at ``floor`` (``softmax_floor``, or what
    ``auto`` chose; None: not floored), node metadata dropped (``keep_node_metadata: false``). Returns
    what was done, for the report."""
    import onnx

    from edgesmith.onnx_graph.nodes import strip_node_metadata
    from edgesmith.onnx_graph.softmax import floor_softmax_inputs

    model = onnx.load(str(path))
    done: dict[str, Any] = {}
    if floor is not None:
        done["softmax_floor"] = floor_softmax_inputs(model, floor)
    if not cfg.keep_node_metadata:
        done["node_metadata_bytes_removed"] = strip_node_metadata(model.graph)
    onnx.save(model, str(path))
    return done


def quantization_meta(cfg: QuantizeConfig, floor: float | None = None,
                      choice: dict[str, Any] | None = None) -> dict[str, Any]:
    """``meta["quantization"]``: how the graph was made; ``softmax_floor`` is the floor it carries, and
    with ``auto`` ``softmax_floor_choice`` the decision, the machine and both timings per shape."""
    if cfg.mode == "fp16":
        return {"mode": "fp16", "keep_io_types": cfg.keep_io_types, "fp32_ops": cfg.fp16_float_ops,
                "optimized": cfg.optimize}
    meta: dict[str, Any] = {"mode": cfg.mode, "per_channel": cfg.per_channel, "weight_type": cfg.weight_type,
                            "reduce_range": cfg.reduce_range, "op_types": cfg.target_ops, "optimized": cfg.optimize}
    if cfg.fusions is not None:
        meta["fusions"] = list(cfg.fusions)
    if floor is not None:
        meta["softmax_floor"] = floor
    if choice is not None:
        meta["softmax_floor_choice"] = choice
    if cfg.mode == "static":
        meta.update({"format": "QDQ", "activation_type": cfg.activation_type, "method": cfg.method,
                     "symmetric_activations": cfg.symmetric_activations})
    return meta


def optimize_and_validate(parent: OnnxModel, folder: Path, ctx: Context,
                          fusions: list[str] | None = None) -> tuple[OnnxModel, dict[str, Any]]:
    """ORT's transformer optimizer with the artifact's real head count and width, then the export's
    validation of the optimized graph against its input (ValidationFailed, exit 3, if it differs)."""
    from edgesmith.onnx_graph.optimize import optimized_copy
    from edgesmith.validation import validate

    optimized, info = optimized_copy(parent, folder, fusions)
    result = validate(parent, optimized, OPTIMIZE_ATOL, OPTIMIZE_MIN_COSINE, label="graph optimization",
                      texts=ctx.corpus(PROBE_POOL))
    info.update({"max_abs": result["max_abs"], "min_cosine": result["min_cosine"], "validated": True})
    return optimized, info


def write_fp16(model, output: Path, cfg: QuantizeConfig) -> dict[str, Any]:
    import onnx

    from edgesmith.onnx_graph.fp16 import convert_fp16, fp16_split

    converted = convert_fp16(model, keep_io_types=cfg.keep_io_types, float_ops=cfg.fp16_float_ops)
    onnx.save(converted, str(output))
    split = fp16_split(converted.graph)
    if not split["fp16"]:
        raise BadInput("FP16 conversion left every node in FP32 (is the graph already FP16, or all its ops blocked?)")
    return {"fp16": {"count": split["fp16"]}, "float": {"count": split["fp32"]},
            "io_types": "fp32" if cfg.keep_io_types else "fp16"}
