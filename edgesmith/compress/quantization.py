"""Quantization of ONNX graphs with ONNX Runtime's tooling, checked against the parent and the source.

Modes (``mode``):

- ``dynamic`` (``quantize_dynamic``): int8 weights (per output channel by default), activations
  quantized at run time. No calibration. Embedding tables optionally 8-bit too.
- ``static`` (``quantize_static``, QDQ): activations quantized with ranges calibrated on texts
  (minmax, entropy or percentile) read lazily from a file in bounded memory
  (:mod:`edgesmith.compress.calibration`). Transformer defaults: only weight MatMuls/Gemms are
  quantized; activation x activation MatMuls (attention scores), LayerNorm, Softmax and GELU stay
  float unless asked (``activation_matmuls``, ``extra_op_types``); and the FFN down-projections
  (weight MatMuls fed by a GELU/ReLU output, whose long-tailed inputs one 8-bit scale cannot
  cover) stay float (``ffn_down_float``). ORT's default op set takes MiniLM to cosine 0.38, weight
  MatMuls only to 0.94, with the FFN down-projections float to 0.99 (FIELD-NOTES).
- ``fp16``: FP16 weights and compute for GPU targets; graph inputs/outputs and sensitive op
  types stay FP32 (:mod:`edgesmith.compress.fp16`).

``optimize`` first runs ONNX Runtime's transformer optimizer with the artifact's real head count
and hidden size (:mod:`edgesmith.compress.graph_optimize`) and validates the optimized graph
against its input. ``max_drop`` turns on the accuracy-aware search
(:mod:`edgesmith.compress.fallback`): the fewest weight nodes go back to float until the gate
holds, or :class:`GateFailed` (exit 3).

Every result is measured against its parent graph on the run's texts: below ``min_cosine`` it is
refused (:class:`ValidationFailed`, exit 3). The report (lineage and run report) holds sizes, the
nodes quantized and left in float (and why), fidelity against the parent and against the run's
source model, and, with ``speed_check``, latency against the parent with a ``slower_than_parent``
flag.
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

from pydantic import field_validator, model_validator

from edgesmith.artifacts import META_FILE, ONNX_FILE, Artifact, OnnxModel, TorchModel
from edgesmith.compress.base import Context, Pass, PassConfig, register
from edgesmith.errors import BadInput, ValidationFailed

log = logging.getLogger(__name__)

#: op types that carry weights and that ORT's dynamic (IntegerOps) quantizer handles. Gemm is
#: rewritten to MatMul + Add by the dynamic quantizer and quantized as a MatMul; Gather (embedding
#: tables) is chosen with ``quantize_embeddings`` rather than listed here.
DYNAMIC_WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Attention", "LSTM", "EmbedLayerNormalization")
#: weight op types of static (QDQ) mode
STATIC_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
#: which input of each op type holds its weight
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Attention": 1, "LSTM": 1, "Gather": 0,
                "EmbedLayerNormalization": 2}
#: op types whose output feeds an FFN down-projection
ACTIVATION_FUNCTIONS = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu", "Erf", "Tanh", "Sigmoid", "Mul")
#: texts embedded by both graphs for the mean-cosine and neighbour-recall part of the report
FIDELITY_TEXTS = 64
#: sentences the probe batches of ``compare_outputs`` are drawn from
PROBE_POOL = 256
#: what every graph change (optimization) must keep, against its input
OPTIMIZE_ATOL = 1e-3
OPTIMIZE_MIN_COSINE = 0.9999

_STATIC_ONLY = ("calibration", "text_field", "calibration_samples", "calibration_batch", "calibration_seq",
                "calibration_chunk", "method", "percentile", "activation_type", "symmetric_activations",
                "ffn_down_float", "activation_matmuls", "extra_op_types")
_FP16_ONLY = ("keep_io_types", "fp16_float_ops")
_INT8_ONLY = ("per_channel", "op_types", "reduce_range", "weight_type", "max_drop", "gate_against", "eval_texts")


def dynamic_supported_ops() -> list[str]:
    """Op types the installed onnxruntime's dynamic quantizer can quantize (Gather aside)."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    return [op for op in DYNAMIC_WEIGHT_OPS if op in IntegerOpsRegistry or op == "Gemm"]


class QuantizeConfig(PassConfig):
    """How to quantize. ``mode``: ``dynamic`` | ``static`` | ``fp16``.

    INT8 (dynamic and static):

    - ``per_channel``: one scale per output channel of each weight (per-tensor loses noticeably
      more: MiniLM cosine 0.963 per-tensor vs 0.993 per-channel).
    - ``op_types``: weight op types to quantize (dynamic: MatMul, Gemm, Conv, Attention, LSTM,
      EmbedLayerNormalization; static: MatMul, Gemm, Conv).
    - ``reduce_range``: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate.
    - ``weight_type``: ``int8`` (signed, symmetric) or ``uint8``.
    - ``max_drop``: a gate such as ``{cosine: 0.01}`` or ``{accuracy: 0.01}`` (metrics of
      :mod:`edgesmith.quality`); turns on the accuracy-aware search, measured on ``eval_texts``
      texts against ``gate_against`` (the ``parent`` graph, or the run's ``source`` model).

    Dynamic only: ``quantize_embeddings`` (embedding tables as 8-bit).

    Static only: ``calibration`` (a data file streamed lazily, or ``builtin:wordnet``; default the
    run's texts), ``text_field``, ``calibration_samples`` (texts used), ``calibration_batch``,
    ``calibration_seq`` (tokens per row), ``calibration_chunk`` (batches whose activations the
    calibrator holds at once), ``method`` (minmax, entropy, percentile), ``percentile``,
    ``activation_type`` (uint8 or int8), ``symmetric_activations``, ``ffn_down_float``,
    ``activation_matmuls`` (also quantize attention-score MatMuls), ``extra_op_types`` (quantize
    every node of these activation op types too, e.g. Softmax, LayerNormalization, Gelu, Add).

    FP16 only: ``keep_io_types`` (FP32 graph inputs/outputs), ``fp16_float_ops`` (op types kept FP32).

    All modes: ``optimize`` (ORT transformer optimizer first), ``min_cosine`` (floor of the pooled
    cosine to the parent), ``speed_check`` (time parent and result, record ``slower_than_parent``).
    """

    mode: Literal["dynamic", "static", "fp16"] = "dynamic"
    per_channel: bool = True
    op_types: list[str] = ["MatMul", "Gemm"]
    quantize_embeddings: bool = False
    reduce_range: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    min_cosine: float = 0.95
    # static
    calibration: str | None = None
    text_field: str = "text"
    calibration_samples: int = 256
    calibration_batch: int = 8
    calibration_seq: int = 128
    calibration_chunk: int = 4
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = 99.999
    activation_type: Literal["uint8", "int8"] = "uint8"
    symmetric_activations: bool = False
    ffn_down_float: bool = True
    activation_matmuls: bool = False
    extra_op_types: list[str] = []
    # fp16
    keep_io_types: bool = True
    fp16_float_ops: list[str] = ["LayerNormalization", "SkipLayerNormalization", "Softmax", "Pow", "ReduceMean", "Exp"]
    # all modes
    optimize: bool = False
    speed_check: bool = False
    # accuracy-aware
    max_drop: dict[str, float] = {}
    gate_against: Literal["parent", "source"] = "parent"
    eval_texts: int = 128

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

    @field_validator("percentile")
    @classmethod
    def _percentile_range(cls, value: float) -> float:
        if not 50.0 < value <= 100.0:
            raise ValueError("percentile lies above 50 and at most 100 (e.g. 99.999)")
        return value

    @field_validator("calibration_samples", "calibration_batch", "calibration_seq", "calibration_chunk", "eval_texts")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value

    @field_validator("max_drop")
    @classmethod
    def _gate(cls, value: dict[str, float]) -> dict[str, float]:
        from edgesmith.quality import is_known_metric, known_metrics

        for name, drop in value.items():
            if not is_known_metric(name):
                raise ValueError(f"unknown metric '{name}'; use one of {', '.join(known_metrics())} (recall@10)")
            if not 0 <= drop < 1e9:
                raise ValueError(f"the allowed drop of {name} must be 0 or more (got {drop})")
        return value

    @model_validator(mode="after")
    def _options_fit_mode(self) -> QuantizeConfig:
        given = self.model_fields_set
        foreign = {"dynamic": (*_STATIC_ONLY, *_FP16_ONLY), "static": (*_FP16_ONLY, "quantize_embeddings"),
                   "fp16": (*_STATIC_ONLY, *_INT8_ONLY, "quantize_embeddings")}[self.mode]
        wrong = [name for name in foreign if name in given]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} do(es) not apply to mode '{self.mode}'")
        if self.mode == "static":
            bad = [op for op in self.op_types if op not in STATIC_WEIGHT_OPS]
            if bad:
                raise ValueError(f"static mode quantizes weight op types {', '.join(STATIC_WEIGHT_OPS)}, not {', '.join(bad)}")
        if self.method != "percentile" and "percentile" in given:
            raise ValueError("percentile applies to method: percentile only")
        return self

    @property
    def target_ops(self) -> list[str]:
        return self.op_types + (["Gather"] if self.quantize_embeddings else [])

    @property
    def precision(self) -> str:
        return "fp16" if self.mode == "fp16" else f"{self.weight_type}-{self.mode}"


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
            base, report["optimize"] = optimize_and_validate(parent, work / "optimized", ctx)
        model = onnx.load(str(base.path))
        name_nodes(model.graph)
        if cfg.mode == "fp16":
            report.update(write_fp16(model, folder / ONNX_FILE, cfg))
        else:
            report.update(write_int8(base, model, folder / ONNX_FILE, cfg, ctx, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    copy_companions(parent.folder, folder)
    meta = {**copy.deepcopy(parent.meta), "precision": cfg.precision, "quantization": quantization_meta(cfg)}
    quantized = OnnxModel(task=parent.task, name=parent.name, lineage=copy.deepcopy(parent.lineage),
                          meta=meta, folder=folder)
    report["size_after"] = quantized.size_bytes()
    report["size_ratio"] = round(report["size_after"] / max(report["size_before"], 1), 4)
    report["per_channel"] = cfg.per_channel
    report["quantize_seconds"] = round(time.perf_counter() - started, 3)
    return quantized, report


def quantization_meta(cfg: QuantizeConfig) -> dict[str, Any]:
    if cfg.mode == "fp16":
        return {"mode": "fp16", "keep_io_types": cfg.keep_io_types, "fp32_ops": cfg.fp16_float_ops,
                "optimized": cfg.optimize}
    meta: dict[str, Any] = {"mode": cfg.mode, "per_channel": cfg.per_channel, "weight_type": cfg.weight_type,
                            "reduce_range": cfg.reduce_range, "op_types": cfg.target_ops, "optimized": cfg.optimize}
    if cfg.mode == "static":
        meta.update({"format": "QDQ", "activation_type": cfg.activation_type, "method": cfg.method,
                     "symmetric_activations": cfg.symmetric_activations})
    return meta


def optimize_and_validate(parent: OnnxModel, folder: Path, ctx: Context) -> tuple[OnnxModel, dict[str, Any]]:
    """ORT's transformer optimizer with the artifact's real head count and width, then the export's
    validation of the optimized graph against its input (ValidationFailed, exit 3, if it differs)."""
    from edgesmith.compress.graph_optimize import optimized_copy
    from edgesmith.export.onnx import validate

    optimized, info = optimized_copy(parent, folder)
    result = validate(parent, optimized, OPTIMIZE_ATOL, OPTIMIZE_MIN_COSINE, label="graph optimization",
                      texts=ctx.corpus(PROBE_POOL))
    info.update({"max_abs": result["max_abs"], "min_cosine": result["min_cosine"], "validated": True})
    return optimized, info


def write_fp16(model, output: Path, cfg: QuantizeConfig) -> dict[str, Any]:
    import onnx

    from edgesmith.compress.fp16 import convert_fp16, fp16_split

    converted = convert_fp16(model, keep_io_types=cfg.keep_io_types, float_ops=cfg.fp16_float_ops)
    onnx.save(converted, str(output))
    split = fp16_split(converted.graph)
    if not split["fp16"]:
        raise BadInput("FP16 conversion left every node in FP32 (is the graph already FP16, or all its ops blocked?)")
    return {"fp16": {"count": split["fp16"]}, "float": {"count": split["fp32"]},
            "io_types": "fp32" if cfg.keep_io_types else "fp16"}


def write_int8(base: OnnxModel, model, output: Path, cfg: QuantizeConfig, ctx: Context, work: Path) -> dict[str, Any]:
    """Quantize ``model`` (dynamic or static) to ``output``; with ``max_drop``, search the float set."""
    import onnx

    before = weight_nodes(model.graph)
    quantizer = Int8Quantizer(model, cfg, work)
    report: dict[str, Any] = {}
    if cfg.mode == "static":
        report["calibration"] = quantizer.calibrate(base, ctx)
    if not quantizer.candidates:
        raise BadInput(f"quantize of {base.name}: no node of op types {', '.join(cfg.target_ops)} has float "
                       "constant weights to quantize (is the graph already quantized?)")
    float_nodes: set[str] = set()
    if cfg.max_drop:
        result = accuracy_aware(base, quantizer, cfg, ctx, work)
        float_nodes = set(result["float_nodes"])
        report["fallback"] = result
    quantizer.write(float_nodes, output)
    after = onnx.load(str(output), load_external_data=False).graph
    split = classify_nodes(before, after)
    if not split["quantized"]:
        raise BadInput(f"quantize of {base.name}: no node of op types {', '.join(cfg.target_ops)} has float "
                       "constant weights to quantize (is the graph already quantized?)")
    reasons = {name: quantizer.kept_float.get(name) or ("accuracy-aware fallback" if name in float_nodes else
                                                         "op type not selected") for name in split["float"]}
    report["quantized"] = {"count": dict(Counter(split["quantized"].values())), "nodes": names_by_op(split["quantized"])}
    report["float"] = {"count": dict(Counter(split["float"].values())),
                       "nodes": {name: {"op": op, "why": reasons[name], "module": quantizer.modules.get(name)}
                                 for name, op in sorted(split["float"].items())}}
    if cfg.mode == "static":
        report["activation_quantized"] = quantizer.activation_nodes
    return report


class Int8Quantizer:
    """ONNX Runtime's dynamic or static quantizer over one prepared graph, able to write the graph
    again with any subset of its candidate weight nodes left in float (for the accuracy search).

    ``candidates``: {node: kind} of the weight nodes this config quantizes; ``kept_float``: nodes
    left float by the defaults, with the reason; ``modules``: the torch module each node came from.
    """

    def __init__(self, model, cfg: QuantizeConfig, work: Path):
        self.model = model
        self.cfg = cfg
        self.work = work
        self.cache_path: Path | None = None
        graph = model.graph
        self.modules = {n.name: module_path(n) for n in graph.node}
        weights = weight_nodes(graph)
        targets = set(cfg.target_ops)
        if cfg.mode == "static":
            targets &= set(STATIC_WEIGHT_OPS)
        chosen = {name: op for name, op in weights.items() if op in targets}
        self.kept_float: dict[str, str] = {}
        if cfg.mode == "static" and cfg.ffn_down_float:
            for name in ffn_down_nodes(graph, chosen):
                self.kept_float[name] = "ffn_down_float: FFN down-projection (input is an activation function's output)"
        nodes = {n.name: n for n in graph.node}
        self.candidates = {name: node_kind(nodes[name], graph) for name in chosen if name not in self.kept_float}
        self.activation_nodes: list[str] = []
        if cfg.mode == "static":
            if cfg.activation_matmuls:
                self.activation_nodes += [n.name for n in graph.node if n.op_type == "MatMul" and n.name not in weights]
            extra = set(cfg.extra_op_types)
            self.activation_nodes += [n.name for n in graph.node if n.op_type in extra]

    # static calibration ---------------------------------------------------------------------------
    def calibrate(self, base: OnnxModel, ctx: Context) -> dict[str, Any]:
        """Calibrate activation ranges once, into ORT's calibration cache (see calibration.py)."""
        import onnx

        from edgesmith.compress.calibration import TextCalibrationReader, calibrate, iter_calibration_texts
        from edgesmith.quality import tokenizer_of

        cfg = self.cfg
        if cfg.calibration:
            texts = iter_calibration_texts(cfg.calibration, text_field=cfg.text_field, limit=cfg.calibration_samples)
            origin = cfg.calibration
        elif ctx.texts:
            texts = iter(ctx.texts[:cfg.calibration_samples])
            origin = "the run's data"
        else:
            texts = iter_calibration_texts("builtin:wordnet", limit=cfg.calibration_samples, offset=FIDELITY_TEXTS)
            origin = "builtin:wordnet"
        model_path = self.work / "calibration-input.onnx"
        onnx.save(self.model, str(model_path))
        graph_inputs = [i.name for i in self.model.graph.input
                        if i.name not in {init.name for init in self.model.graph.initializer}]
        reader = TextCalibrationReader(texts, tokenizer_of(base), graph_inputs, batch_size=cfg.calibration_batch,
                                       seq=cfg.calibration_seq, chunk_batches=cfg.calibration_chunk)
        self.cache_path = self.work / "calibration.json"
        op_types = sorted({*STATIC_WEIGHT_OPS, *cfg.extra_op_types})
        with quiet_quantizer():
            info = calibrate(model_path, reader, self.cache_path, method=cfg.method, op_types=op_types,
                             symmetric=cfg.symmetric_activations, percentile=cfg.percentile, workdir=self.work)
        model_path.unlink(missing_ok=True)
        info["source"] = origin
        return info

    # writing ---------------------------------------------------------------------------------------
    def write(self, float_nodes: set[str], output: Path) -> None:
        unknown = float_nodes - set(self.candidates)
        if unknown:
            raise ValueError(f"not candidate nodes: {sorted(unknown)}")
        if self.cfg.mode == "static":
            self._write_static(float_nodes, output)
        else:
            self._write_dynamic(float_nodes, output)

    def _write_dynamic(self, float_nodes: set[str], output: Path) -> None:
        ops, exclude = ort_op_selection(self.model.graph, self.cfg.target_ops)
        nodes = {n.name: n.op_type for n in self.model.graph.node}
        for name in float_nodes:
            exclude += [name, f"{name}_MatMul"] if nodes[name] == "Gemm" else [name]
        run_quantize_dynamic(copy.deepcopy(self.model), output, self.cfg, ops, exclude)

    def _write_static(self, float_nodes: set[str], output: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        from edgesmith.compress.calibration import ort_method

        assert self.cache_path is not None, "calibrate first"
        cfg = self.cfg
        quantize = [n for n in self.candidates if n not in float_nodes] + self.activation_nodes
        if not quantize:
            onnx.save(self.model, str(output))
            return
        types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        op_types = sorted({self.model_op(n) for n in quantize})
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT, "ActivationSymmetric": cfg.symmetric_activations,
                 "WeightSymmetric": cfg.weight_type == "int8"}
        try:
            with quiet_quantizer():
                quantize_static(copy.deepcopy(self.model), output, None, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=op_types, per_channel=cfg.per_channel,
                                reduce_range=cfg.reduce_range, activation_type=types[cfg.activation_type],
                                weight_type=types[cfg.weight_type], nodes_to_quantize=quantize,
                                calibrate_method=ort_method(cfg.method), extra_options=extra,
                                calibration_cache_path=self.cache_path)
        except Exception as exc:  # the quantizer raises bare Exceptions and ValueErrors alike
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise BadInput(f"ONNX Runtime's static quantizer cannot quantize this graph ({reason}); "
                           "try fewer op_types or extra_op_types, or mode: dynamic") from exc

    def model_op(self, name: str) -> str:
        return next(n.op_type for n in self.model.graph.node if n.name == name)


def accuracy_aware(base: OnnxModel, quantizer: Int8Quantizer, cfg: QuantizeConfig, ctx: Context,
                   work: Path) -> dict[str, Any]:
    """The accuracy-aware search (fallback.py) with quality.evaluate as the measure."""
    from edgesmith.compress.fallback import Gate, search_fallback
    from edgesmith.quality import accuracy, evaluate, reference_outputs

    if base.task not in ("feature-extraction", "sequence-classification"):
        raise BadInput(f"max_drop needs a feature-extraction or sequence-classification model, not {base.task}")
    reference: Artifact = base
    if cfg.gate_against == "source":
        if not isinstance(ctx.source, (OnnxModel, TorchModel)) or ctx.source.task != base.task:
            raise BadInput("gate_against: source needs the run's source model (run the step in a recipe), "
                           "or use gate_against: parent")
        reference = ctx.source
    texts = ctx.corpus(cfg.eval_texts)
    labels = ctx.labels[:len(texts)] if ctx.labels and ctx.texts else None
    if "accuracy" in cfg.max_drop and labels is None:
        raise BadInput("a gate on accuracy needs labelled data (data.label_field); use cosine or agreement otherwise")
    k = min(10, len(texts) - 1)
    if any(name.startswith("recall@") and name != f"recall@{k}" for name in cfg.max_drop):
        raise BadInput(f"the search measures recall@{k} on {len(texts)} texts; gate on recall@{k} or give more texts")
    ref_out = reference_outputs(reference, texts)
    reference_metrics = {"accuracy": accuracy(reference, texts, labels, predictions=ref_out)} if labels else {}
    gate = Gate(dict(cfg.max_drop), reference_metrics)
    trials = work / "trials"
    trials.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json"):
        if (base.folder / name).exists():
            shutil.copy2(base.folder / name, trials / name)

    def measure(float_set: set[str]) -> dict[str, float]:
        quantizer.write(float_set, trials / ONNX_FILE)
        trial = OnnxModel(task=base.task, name=base.name, folder=trials)
        return evaluate(trial, None, texts, labels, k=k, reference_embeddings=ref_out)

    started = time.perf_counter()
    result = search_fallback(quantizer.candidates, measure, gate, base.name)
    sizes = weight_bytes(quantizer.model.graph)
    return {
        "gate": dict(cfg.max_drop), "against": cfg.gate_against, "texts": len(texts),
        "sensitivity": "kinds returned to float from the fully quantized graph, then nodes inside the float set",
        "evaluations": result.evaluations, "seconds": round(time.perf_counter() - started, 2),
        "all_quantized": result.all_quantized, "final": result.metrics, "kinds": result.kinds,
        "float_nodes": result.float_nodes,
        "float_node_costs": {n: {"kind": quantizer.candidates[n], "module": quantizer.modules.get(n),
                                 f"{gate.primary}_drop_if_quantized": result.node_costs.get(n),
                                 "extra_bytes_in_float": int(sizes.get(n, 0) * 3 / 4)}
                             for n in result.float_nodes},
    }


def weight_bytes(graph) -> dict[str, int]:
    """FP32 bytes of each weight node's weight (what it costs in size to keep it float: 3/4 of it)."""
    import numpy as np

    dims = {i.name: int(np.prod(i.dims)) * 4 for i in graph.initializer}
    return {n.name: dims.get(n.input[WEIGHT_INPUT[n.op_type]], 0) for n in graph.node
            if n.op_type in WEIGHT_INPUT and len(n.input) > WEIGHT_INPUT[n.op_type]}


def module_path(node) -> str | None:
    """The torch module a node came from (the dynamo exporter's ``namespace`` metadata), e.g.
    ``encoder.layer.0.output.dense``; None when the graph has no such metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    namespace = meta.get("namespace")
    if not namespace:
        return None
    parts = namespace.split("/")
    # ".../encoder.layer.0.output.dense: torch.nn.modules.linear.Linear/linear_5: aten.linear.default"
    for part in reversed(parts[:-1] if len(parts) > 1 else parts):
        path = part.split(":")[0].strip()
        if path:
            return path
    return None


def node_kind(node, graph=None) -> str:
    """What a node is, independent of its layer: its module path with layer indices as ``*``
    (``encoder.layer.*.output.dense``), else its op type and the op that feeds it."""
    import re

    path = module_path(node)
    if path:
        return re.sub(r"\.\d+(?=\.|$)", ".*", path)
    if graph is not None:
        producers = {o: n.op_type for n in graph.node for o in n.output}
        return f"{node.op_type}<-{producers.get(node.input[0], 'input')}"
    return node.op_type


def ffn_down_nodes(graph, weight: dict[str, str]) -> list[str]:
    """Weight nodes whose activation input comes from an activation function (GELU, ReLU, ...):
    the FFN down-projections. A ``Mul`` counts only as the end of an erf- or tanh-built GELU."""
    producers = {o: n for n in graph.node for o in n.output}

    def is_activation(node, depth: int = 0) -> bool:
        if node is None or depth > 4:
            return False
        if node.op_type in ACTIVATION_FUNCTIONS and node.op_type != "Mul":
            return True
        if node.op_type == "Mul":
            return any(is_activation(producers.get(i), depth + 1) for i in node.input)
        if node.op_type == "Add" and depth > 0:
            return any(is_activation(producers.get(i), depth + 1) for i in node.input)
        return False

    nodes = {n.name: n for n in graph.node}
    return [name for name, op in weight.items() if op in ("MatMul", "Gemm")
            and is_activation(producers.get(nodes[name].input[0]))]


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
    """The node's weight is an 8-bit initializer (dynamic), or the output of a DequantizeLinear of
    one (static QDQ)."""
    import onnx

    index = WEIGHT_INPUT.get(node.op_type)
    if index is None or len(node.input) <= index:
        return False
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    inits = {init.name: init.data_type for init in graph.initializer}
    weight = node.input[index]
    if inits.get(weight) in eight_bit:
        return True
    producer = next((n for n in graph.node if weight in n.output), None)
    return (producer is not None and producer.op_type == "DequantizeLinear"
            and inits.get(producer.input[0]) in eight_bit)


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
    from edgesmith.profiling import bootstrap_speedup, build_feeds, measure, summarize, verdict_of
    from edgesmith.runtimes.base import get_runtime

    runtime = get_runtime("onnxruntime")
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


# the torch-side pass registers with the quantize module (the registry imports this module)
import edgesmith.compress.torch_quantization  # noqa: E402,F401
