"""The weight-only entry point: read the graph, quantize it with the config's method (or repack its
source's ready blocks), write the result and its report."""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from edgesmith.artifacts import OnnxModel, copy_companions
from edgesmith.compress.quantization.weight_only.candidates import Candidates, find_candidates, vocab_size
from edgesmith.compress.quantization.weight_only.compose import Variant, compose
from edgesmith.compress.quantization.weight_only.config import WeightOnlyConfig
from edgesmith.compress.quantization.weight_only.methods import ALGORITHMS, Request
from edgesmith.compress.quantization.weight_only.ort import quantize_embedding_gather
from edgesmith.compress.quantization.weight_only.passages import calibration_feeds
from edgesmith.compress.quantization.weight_only.search import rounded, search_fallback
from edgesmith.errors import BadInput, first_line
from edgesmith.onnx_graph.edit import save_graph
from edgesmith.onnx_graph.lm_head import materialize_transposed_weights
from edgesmith.onnx_graph.nodes import name_nodes
from edgesmith.onnx_graph.pack import pack_matmulnbits
from edgesmith.passes import Context, make_config

log = logging.getLogger(__name__)


def quantize_weight_only(model: OnnxModel, config: WeightOnlyConfig | dict, ctx: Context | None = None) -> OnnxModel:
    """Weight-only quantize ``model`` into a new folder (``ctx.scratch``); the report goes into
    ``ctx.report`` and, summarized, into the result's ``meta["quantization"]``."""
    cfg = config if isinstance(config, WeightOnlyConfig) else make_config(WeightOnlyConfig, dict(config),
                                                                         where="weight-only quantization")
    ctx = ctx or Context()
    started = time.perf_counter()
    folder = ctx.scratch("weight-only")
    work = ctx.scratch("weight-only-work")
    try:
        original, candidates, report = _read_graph(model, cfg)
        excluded = [] if cfg.quantize_lm_head or candidates.lm_head is None else [candidates.lm_head]
        if cfg.source is not None:
            quantized_proto, precisions, embedding = cfg.source.repack(
                original, cfg.source_file, candidates, excluded, accuracy_level=cfg.accuracy_level,
                embedding=cfg.embedding, report=report)
        else:
            quantized_proto, precisions, embedding = _quantize_graph(model, original, candidates, excluded, cfg,
                                                                     report, work)
        if cfg.pack if cfg.pack is not None else _gqa_graph(model):
            packing = pack_matmulnbits(quantized_proto)
            report["packed"] = {"groups": len(packing["packed"]), "nodes_before": packing["nodes_before"],
                                "nodes_after": packing["nodes_after"]}
        quantize_seconds = time.perf_counter() - started
        save_graph(quantized_proto, folder)
        del quantized_proto
        copy_companions(model.folder, folder)
        result = _result(model, cfg, folder, candidates, precisions, embedding, report)
        report["quantize_seconds"] = round(quantize_seconds, 2)
        if model.task == "text-generation":
            from edgesmith.lm_quality import lm_fidelity

            final = (report.get("fallback") or {}).get("final")
            # the search measured exactly this graph on the held-out passages, unless the embedding changed since
            report["fidelity"] = final if final and not cfg.embedding else rounded(
                lm_fidelity(result, model, tokenizer=model.tokenizer))
        report["seconds"] = round(time.perf_counter() - started, 2)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.report.update(report)
    log.info("weight-only %s (%s): %.1f MB -> %.1f MB%s", result.meta["precision"], cfg.method,
             report["size_before"] / 1e6, report["size_after"] / 1e6,
             f", KL {report['fidelity']['kld']:.4g}, top-1 {report['fidelity']['top1']:.4f}" if "fidelity" in report else "")
    return result


def _gqa_graph(model: OnnxModel) -> bool:
    """A GroupQueryAttention decoder (ORT GenAI's layout), where packed projections were measured."""
    return ((model.meta or {}).get("decoder") or {}).get("layout") == "genai"


def _read_graph(model: OnnxModel, cfg: WeightOnlyConfig) -> tuple[Any, Candidates, dict[str, Any]]:
    """The graph (nodes named, transposed weights made constant), its candidates and the report's start;
    BadInput when there is nothing to quantize or the method does not fit the model."""
    import onnx

    try:
        original = onnx.load(str(model.path))
    except Exception as exc:
        raise BadInput(f"{model.path}: cannot read it as ONNX ({first_line(exc, 200)})") from exc
    name_nodes(original.graph)
    transposed = materialize_transposed_weights(original.graph)
    candidates = find_candidates(original.graph, vocab_size(model))
    if not candidates.nodes:
        raise BadInput(f"{model.path}: no MatMul with a constant 2-D float weight to quantize (already quantized, "
                       "or weights in Gemm/Conv); weight-only int4/int8 is for transformer MatMuls, use mode dynamic")
    is_decoder = model.task == "text-generation"
    if cfg.max_kld is not None and not is_decoder:
        raise BadInput(f"max_kld measures a causal LM's next-token KL; {model.name} is a {model.task} model "
                       "(drop max_kld, or give a decoder)")
    if cfg.algorithm is not None and cfg.algorithm.needs_calibration and not is_decoder:
        raise BadInput(f"method {cfg.method} calibrates on token passages in the decoder layout; {model.name} is a "
                       f"{model.task} model (use method rtn or hqq)")
    report: dict[str, Any] = {"mode": cfg.source.mode if cfg.source else f"{cfg.precision}-weight",
                              "method": cfg.method, "accuracy_level": cfg.accuracy_level,
                              "size_before": model.size_bytes()}
    if transposed:
        report["transposed_weights_materialized"] = transposed
    return original, candidates, report


def _result(model: OnnxModel, cfg: WeightOnlyConfig, folder: Path, candidates: Candidates, precisions: dict[str, str],
            embedding: str, report: dict[str, Any]) -> OnnxModel:
    """The written folder as an OnnxModel whose ``meta["quantization"]`` summarizes ``report`` (filled in)."""
    by_precision: dict[str, list[str]] = {}
    for name in candidates.nodes:
        by_precision.setdefault(precisions[name], []).append(name)
    report["nodes"] = {p: {"count": len(v), "names": sorted(v)} for p, v in sorted(by_precision.items())}
    report["lm_head"] = ({"node": candidates.lm_head, "precision": precisions[candidates.lm_head]}
                         if candidates.lm_head else None)
    report["embedding"] = {"node": candidates.embedding, "precision": embedding} if candidates.embedding else None
    meta = {**copy.deepcopy(model.meta), "precision": _precision(by_precision),
            "quantization": {"mode": report["mode"], "method": cfg.method, "bits": report.get("bits"),
                             "block": report.get("block"), "symmetric": report.get("symmetric"),
                             "accuracy_level": cfg.accuracy_level,
                             "lm_head": report["lm_head"]["precision"] if report["lm_head"] else None,
                             "embedding": report["embedding"]["precision"] if report["embedding"] else None,
                             "nodes": {p: v["count"] for p, v in report["nodes"].items()},
                             "max_kld": cfg.max_kld}}
    result = OnnxModel(task=model.task, name=model.name, lineage=copy.deepcopy(model.lineage), meta=meta,
                       folder=folder)
    report["size_after"] = result.size_bytes()
    report["size_ratio"] = round(report["size_after"] / max(report["size_before"], 1), 4)
    return result


def _precision(by_precision: dict[str, list[str]]) -> str:
    """``int4``, ``int4+int8``, ``int4+float``...: the precisions of the weight MatMuls, widest last."""
    return "+".join(p for p in ("int4", "int8", "float") if by_precision.get(p))


def _quantize_graph(model: OnnxModel, original, candidates: Candidates, excluded: list[str], cfg: WeightOnlyConfig,
                    report: dict[str, Any], work: Path) -> tuple[Any, dict[str, str], str]:
    """The config's algorithm through ORT's quantizer (and the accuracy-aware search): the graph, each
    candidate's precision, the embedding's."""
    algorithm = ALGORITHMS[cfg.method]
    report.update({"bits": cfg.bits, "block": cfg.block,
                   "symmetric": cfg.symmetric if not algorithm.float_zero_points else False})
    if algorithm.float_zero_points:
        report["float_zero_points"] = True
    if algorithm.warning:
        log.warning(algorithm.warning)
    calibration = calibration_feeds(model, original.graph, cfg) if algorithm.needs_calibration else None
    request = Request(bits=cfg.bits, block=cfg.block, symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level,
                      calibration=calibration, gptq_damp=cfg.gptq_damp, gptq_actorder=cfg.gptq_actorder)
    variants = {"main": Variant.of(cfg.method, cfg.bits, original,
                                   algorithm.quantize(original, request, exclude=excluded), candidates)}
    base = {n: ("main" if n in variants["main"].replacements and n not in excluded else "float")
            for n in candidates.nodes}
    if not any(label == "main" for label in base.values()):
        raise BadInput(f"{model.path}: ONNX Runtime's quantizer took none of the {len(candidates.nodes)} MatMul "
                       "weights; check that K and N are at least the block size")
    assignment = base
    if cfg.max_kld is not None:
        if cfg.bits == 4 and cfg.fallback == "int8":
            int8 = Request(bits=8, block=cfg.block, symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level)
            variants["int8"] = Variant.of("rtn", 8, original, ALGORITHMS["rtn"].quantize(original, int8,
                                                                                          exclude=excluded),
                                          candidates, suffix="_int8")
        assignment, report["fallback"] = search_fallback(model, original, variants, candidates, base, cfg, work)
    quantized = compose(original, variants, assignment)
    embedding = "float"
    if cfg.embedding and candidates.embedding:
        quantize_embedding_gather(quantized, candidates.embedding, block=cfg.block, symmetric=cfg.symmetric)
        embedding = "int4"
    labels = {"main": cfg.precision, "int8": "int8", "float": "float"}
    return quantized, {n: labels[assignment[n]] for n in candidates.nodes}, embedding
