"""INT8 quantization with ONNX Runtime's dynamic and static (QDQ) quantizers, and the accuracy-aware search.

:class:`Int8Quantizer` drives the quantizer over one prepared graph and can write it again with any
subset of its weight nodes left in float; :func:`accuracy_aware` searches that subset. Every
quantizer call goes through the small wrappers at the end (op selection, a quiet root logger,
one-line errors: :func:`quantizer_errors`)."""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgesmith.artifacts import ONNX_FILE, Artifact, OnnxModel, TorchModel
from edgesmith.compress.quantization.config import FIDELITY_TEXTS, STATIC_WEIGHT_OPS, QuantizeConfig
from edgesmith.errors import BadInput
from edgesmith.onnx_graph.nodes import (
    classify_nodes,
    ffn_down_nodes,
    module_path,
    names_by_op,
    node_kind,
    weight_bytes,
    weight_nodes,
)
from edgesmith.passes import Context


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

        from edgesmith.compress.quantization.calibration import TextCalibrationReader, calibrate, iter_calibration_texts
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

        from edgesmith.compress.quantization.calibration import ort_method

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
        with quantizer_errors("ONNX Runtime's static quantizer cannot quantize this graph",
                              "; try fewer op_types or extra_op_types, or mode: dynamic"), quiet_quantizer():
            quantize_static(copy.deepcopy(self.model), output, None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=op_types, per_channel=cfg.per_channel,
                            reduce_range=cfg.reduce_range, activation_type=types[cfg.activation_type],
                            weight_type=types[cfg.weight_type], nodes_to_quantize=quantize,
                            calibrate_method=ort_method(cfg.method), extra_options=extra,
                            calibration_cache_path=self.cache_path)

    def model_op(self, name: str) -> str:
        return next(n.op_type for n in self.model.graph.node if n.name == name)


def accuracy_aware(base: OnnxModel, quantizer: Int8Quantizer, cfg: QuantizeConfig, ctx: Context,
                   work: Path) -> dict[str, Any]:
    """The accuracy-aware search (fallback.py) with quality.evaluate as the measure."""
    from edgesmith.compress.quantization.fallback import Gate, search_fallback
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
    with quantizer_errors("ONNX Runtime's quantizer cannot quantize this graph",
                          "; try fewer op_types or per_channel: false"), quiet_quantizer():
        quantize_dynamic(model, output, op_types_to_quantize=ops, per_channel=cfg.per_channel,
                         reduce_range=cfg.reduce_range, weight_type=weight_type,
                         nodes_to_exclude=exclude, extra_options=extra)


@contextlib.contextmanager
def quantizer_errors(what: str, advice: str = "") -> Iterator[None]:
    """Whatever ONNX Runtime's quantizer raises inside, as a one-line :class:`BadInput`:
    ``"{what} ({first line of the error}){advice}"``. Used by every quantizer call (dynamic, static,
    and the early-exit segments)."""
    try:
        yield
    except Exception as exc:  # the quantizer raises bare Exceptions and ValueErrors alike
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInput(f"{what} ({reason}){advice}") from exc
