"""Weight-only INT4/INT8 quantization of ONNX graphs (decoders first) with ONNX Runtime's
``MatMulNBitsQuantizer``, and an accuracy-aware mode bounded by KL divergence.

Decoding is memory-bound: every token reads every weight once, so 4-bit weights are what makes a
small LM fast on a CPU (SmolLM2-135M: PyTorch FP32 13-14 tokens/s, llama.cpp Q4_1 100-119, ORT
GenAI's INT4 103-109; FIELD-NOTES § Decoders). Each MatMul with a constant 2-D weight becomes a
``MatMulNBits`` (block-wise along K, one scale, and zero point unless symmetric, per block);
activations stay float and ``accuracy_level`` 4 lets the CPU kernel quantize them to int8 per
block (2.9x faster than level 0 at M = 1 on our CPU).

Methods, all ORT's own: ``rtn`` (``DefaultWeightOnlyQuantConfig``, round to nearest, C++),
``hqq`` (half-quadratic, no data; float zero points), ``gptq`` (second-order, calibrated on
corpus passages in the decoder layout; 4 bits only in ORT), and ``k-quant`` (llama.cpp-style scale
search, when the installed ORT has ``KQuantWeightOnlyQuantConfig``). The tied LM head (the widest
MatMul: 49,152 x 576 in SmolLM2) is quantized or kept float by ``quantize_lm_head``; the embedding
table (a Gather) becomes a 4-bit ``GatherBlockQuantized`` with ``quantize_embedding``.

Small models suffer most from 4 bits (GPTQ paper: OPT-125M perplexity 27.7 -> 37.3 with RTN), so
``max_kld`` turns on the search: the graph is quantized once per precision (main method, and
8-bit RTN for the fallback), and candidate graphs are composed node by node from those copies
(ORT's GPTQ measures each MatMul's inputs on the float graph, so a node's quantized weight does
not depend on which others are quantized). Layer groups (all MatMuls of one decoder layer, the
LM head alone) are ranked by the KL divergence each costs when it alone is quantized, on probe
passages from the calibration side of the corpus; the most sensitive go to the fallback precision
until the KL on the held-out passages (:mod:`edgesmith.lm_quality`) is within the budget. If even
every group at the fallback misses it, :class:`GateFailed` (exit 3): the budget is a quality gate
that cannot hold, not a malformed input.

Measured on SmolLM2-135M-Instruct (the FP32 model transformers dequantizes from the packaged Q4_1
GGUF; 540 held-out tokens; KL/top-1 against the FP32 ONNX parent; 2 shared cores; block 32,
accuracy level 4; sizes include the 113 MB float embedding table unless repacked):

==========================  ==========  ======  =====  ==========  =======
variant                     quantize s  KL      top-1  perplexity  size MB
==========================  ==========  ======  =====  ==========  =======
FP32 parent                 -           0       1      159.0       653
rtn int4 (asym)             11          0.466   0.585  215.8       201
rtn int4, symmetric         3           0.440   0.563  203.9       199
rtn int4, LM head float     6           0.372   0.644  198.6       296
hqq int4                    119         0.094   0.717  180.4       216
k-quant int4                116         0.494   0.543  217.0       201
gptq int4 (8 x 128 tokens)  1369        0.468   0.596  217.2       201
rtn int8                    10          0.0053  0.943  158.9       270
gguf repack (exact)         8           0.0186  0.898  158.5       147
gguf repack, level 0        7           <1e-5   1.000  159.0       147
==========================  ==========  ======  =====  ==========  =======

Re-quantizing weights that are already on a 4-bit grid adds a second rounding: every
re-quantizer costs far more than the repack, whose only loss is level 4's int8 activations.
ORT's C++ RTN widens each block's range to include 0; its GPTQ (which re-rounds GPTQ's output
with a fresh min/max) lands where RTN does, at 100x the time; HQQ is the most faithful
re-quantizer but writes float zero points, which take MatMulNBits' slow CPU kernel (a one-token
forward of SmolLM2 took over 1 s against tens of ms for the others), so it is not a decode format.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from edgesmith.artifacts import META_FILE, ONNX_FILE, OnnxModel
from edgesmith.errors import BadInput, GateFailed
from edgesmith.onnx_graph.nodes import name_nodes
from edgesmith.passes import Context, PassConfig, make_config

log = logging.getLogger(__name__)

#: the loggers ORT's weight-only quantizers talk on (INFO per node; the import even sets the root
#: logger to INFO when it has no handler)
ORT_LOGGERS = ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor")
#: corpus offsets (both before lm_quality.HELDOUT_START): GPTQ calibration, sensitivity probes
CALIBRATION_OFFSET = 0
PROBE_OFFSET = 20_000
#: graphs larger than this are written with their tensors in model.onnx.data
EXTERNAL_DATA_BYTES = 2_000_000_000
LAYER_INDEX = re.compile(r"(?:^|[./_ ])(?:layers|layer|h|blocks|block)[./_](\d+)(?=[./_:]|$)")
FLOAT_TYPES = (1, 10, 16)  # FLOAT, FLOAT16, BFLOAT16
METHODS = ("rtn", "hqq", "gptq", "k-quant", "gguf")


def ort_quantizer_module():
    """``onnxruntime.quantization.matmul_nbits_quantizer``, imported without its side effect: at
    import it calls ``logging.basicConfig(level=INFO)``, which would print every INFO record of
    every library with a timestamp when the application has not configured logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return matmul_nbits_quantizer


def kquant_available() -> bool:
    return hasattr(ort_quantizer_module(), "KQuantWeightOnlyQuantConfig")


class WeightOnlyConfig(PassConfig):
    """How to quantize weights only.

    - ``bits``: 4 or 8; ``block``: weights per scale along K (a power of two, at least 16);
      ``symmetric``: no zero points (rtn, gptq, k-quant; hqq always has float zero points).
    - ``method``: ``rtn`` | ``hqq`` | ``gptq`` (4 bits; ``calibration_passages`` corpus passages of
      ``calibration_tokens`` tokens) | ``k-quant``.
    - ``accuracy_level``: MatMulNBits' compute precision for the activations (4 = int8, fastest on CPU).
    - ``quantize_lm_head``: the output projection too (else float); ``quantize_embedding``: the
      embedding table as 4-bit GatherBlockQuantized (bits 4 only; default off, lossy).
    - ``method: gguf`` with ``gguf_file``: no re-quantization: the GGUF's own Q4_0/Q4_1/Q8_0 blocks
      repacked exactly (:mod:`edgesmith.gguf.repack`); the model must be the FP32 one transformers
      dequantized from that file. The GGUF decides bits and blocks; the embedding table is repacked
      too (exact) unless ``quantize_embedding: false``.
    - ``max_kld``: KL budget (nats/token, against the parent graph on held-out text); turns on the
      search that returns the most sensitive layer groups to ``fallback`` (``int8`` or ``float``).
    """

    bits: Literal[4, 8] = 4
    block: int = 32
    method: Literal["rtn", "hqq", "gptq", "k-quant", "gguf"] = "rtn"
    symmetric: bool = False
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    quantize_lm_head: bool = True
    quantize_embedding: bool | None = None
    gguf_file: str | None = None
    max_kld: float | None = None
    fallback: Literal["int8", "float"] = "int8"
    calibration_passages: int = 8
    calibration_tokens: int = 128
    probe_passages: int = 2
    gptq_damp: float = 0.01
    gptq_actorder: bool = False

    @field_validator("block")
    @classmethod
    def _block(cls, value: int) -> int:
        if value < 16 or value & (value - 1):
            raise ValueError(f"block must be a power of two and at least 16 (e.g. 32, 64, 128), not {value}")
        return value

    @field_validator("max_kld")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value < float("inf"):
            raise ValueError(f"max_kld is a KL divergence in nats per token, 0 or more (e.g. 0.05), not {value}")
        return value

    @field_validator("calibration_passages", "calibration_tokens", "probe_passages")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WeightOnlyConfig:
        given = self.model_fields_set
        if self.method == "gptq" and self.bits != 4:
            raise ValueError("method gptq writes 4-bit weights only (ONNX Runtime's GPTQ); use bits: 4 or method rtn/hqq")
        if self.method == "hqq" and "symmetric" in given and self.symmetric:
            raise ValueError("method hqq always uses (float) zero points; drop symmetric or use method rtn")
        if self.method == "k-quant" and not kquant_available():
            raise ValueError("this onnxruntime has no k-quant (KQuantWeightOnlyQuantConfig); upgrade it or use rtn")
        if self.method == "gguf":
            fixed = [n for n in ("bits", "block", "symmetric", "max_kld", "fallback") if n in given]
            if fixed:
                raise ValueError(f"{', '.join(fixed)} do(es) not apply to method gguf: the GGUF's own blocks are "
                                 "repacked exactly")
            if not self.gguf_file:
                raise ValueError("method gguf needs gguf_file: the .gguf the model was dequantized from")
        elif "gguf_file" in given:
            raise ValueError("gguf_file applies to method gguf only")
        elif self.quantize_embedding and self.bits != 4:
            raise ValueError("quantize_embedding writes a 4-bit GatherBlockQuantized; use bits: 4")
        if "fallback" in given and self.max_kld is None:
            raise ValueError("fallback applies to the accuracy-aware search only; set max_kld")
        foreign = [n for n in ("calibration_passages", "gptq_damp", "gptq_actorder") if n in given]
        if foreign and self.method != "gptq":
            raise ValueError(f"{', '.join(foreign)} apply to method gptq only")
        return self

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    @property
    def embedding(self) -> bool:
        """Whether the embedding table is quantized: by default only when that is exact (gguf)."""
        return self.method == "gguf" if self.quantize_embedding is None else self.quantize_embedding


# ---------------------------------------------------------------------------------------------
# The graph: candidates, LM head, embedding
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """The MatMuls with a constant 2-D float weight (name -> weight initializer), which of them
    is the LM head, the embedding Gather, and each node's layer group."""

    nodes: dict[str, str]
    lm_head: str | None
    embedding: str | None
    groups: dict[str, str]

    def members(self, group: str) -> list[str]:
        return [n for n, g in self.groups.items() if g == group]


def materialize_transposed_weights(graph) -> int:
    """``MatMul(x, Transpose(W))`` of a constant W (how a tied LM head can come out of an exporter)
    -> ``MatMul(x, W_t)`` with a transposed copy, so that the quantizer sees a constant weight."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    done: dict[str, str] = {}
    count = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if len(inits[t.input[0]].dims) != 2 or perm not in ([], [[1, 0]]):
            continue
        if t.output[0] not in done:
            array = numpy_helper.to_array(inits[t.input[0]]).T.copy()
            name = t.output[0] + "_transposed_weight"
            graph.initializer.append(numpy_helper.from_array(array, name))
            done[t.output[0]] = name
        node.input[1] = done[t.output[0]]
        count += 1
    if count:  # a Transpose nothing reads any more would keep its float table alive in the quantized graph
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        live = [n for n in graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
        if len(live) != len(graph.node):
            graph.ClearField("node")
            graph.node.extend(live)
    return count


def vocab_size(model: OnnxModel) -> int | None:
    import json

    decoder = model.meta.get("decoder") or {}
    if isinstance(decoder.get("vocab_size"), int):
        return decoder["vocab_size"]
    config = model.folder / "config.json"
    if config.exists():
        try:
            value = json.loads(config.read_text()).get("vocab_size")
        except (ValueError, UnicodeDecodeError):
            return None
        return value if isinstance(value, int) else None
    return None


def find_candidates(graph, vocab: int | None) -> Candidates:
    inits = {i.name: i for i in graph.initializer}
    nodes: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            init = inits[node.input[1]]
            if len(init.dims) == 2 and init.data_type in FLOAT_TYPES:
                nodes[node.name] = node.input[1]
    lm_head = None
    outputs = {o.name for o in graph.output}
    by_name = {n.name: n for n in graph.node}
    wide = [n for n, w in nodes.items() if vocab is not None and inits[w].dims[1] == vocab]
    feeding_output = [n for n in nodes if by_name[n].output[0] in outputs]
    pick = wide or feeding_output
    if pick:
        lm_head = pick[-1]
    embedding = None
    graph_inputs = {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type == "Gather" and node.input[0] in inits and node.input[1] in graph_inputs:
            init = inits[node.input[0]]
            if len(init.dims) == 2 and init.data_type in FLOAT_TYPES and (vocab is None or init.dims[0] == vocab):
                embedding = node.name
                break
    groups = {}
    for name, weight in nodes.items():
        if name == lm_head:
            groups[name] = "lm_head"
            continue
        namespace = next((p.value for p in by_name[name].metadata_props if p.key == "namespace"), "")
        # the TorchScript exporter names nodes after modules; the dynamo exporter records them as metadata
        match = LAYER_INDEX.search(name) or LAYER_INDEX.search(weight) or LAYER_INDEX.search(namespace)
        groups[name] = f"layer.{int(match.group(1))}" if match else name
    return Candidates(nodes, lm_head, embedding, groups)


# ---------------------------------------------------------------------------------------------
# ORT's quantizer
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """Silence ORT's per-node INFO logs, its progress bar on stdout and numpy's warnings from k-quant."""
    levels = {}
    for name in ORT_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), np.errstate(all="ignore"):
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class _CalibrationReader:
    """ORT's CalibrationDataReader protocol over prepared feeds (deep-copyable: GPTQ copies it)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def calibration_feeds(parent: OnnxModel, graph, cfg: WeightOnlyConfig) -> list[dict[str, np.ndarray]]:
    """GPTQ's calibration data: corpus passages (before the held-out slice), one per run, fed in
    the decoder layout with an empty cache."""
    from edgesmith.lm_quality import calibration_batches, decoder_inputs_from_graph

    spec = decoder_inputs_from_graph(graph, parent.meta, where=str(parent.path))
    batches = calibration_batches(parent.tokenizer, count=cfg.calibration_passages, tokens=cfg.calibration_tokens,
                                  batch_size=1, offset=CALIBRATION_OFFSET)
    return [spec.feeds(b.input_ids, b.attention_mask) for b in batches]


def ort_quantize(model, *, bits: int, block: int, method: str, symmetric: bool, accuracy_level: int,
                 exclude: list[str], calibration: list[dict[str, np.ndarray]] | None = None,
                 gptq_damp: float = 0.01, gptq_actorder: bool = False):
    """Run ONNX Runtime's MatMulNBitsQuantizer on a copy of ``model`` (a ModelProto); return the
    quantized ModelProto. Every MatMul with a constant 2-D weight is quantized but ``exclude``
    (ORT's GPTQ ignores exclusions; the caller composes per node anyway)."""
    mnq = ort_quantizer_module()
    common = {"block_size": block, "is_symmetric": symmetric, "accuracy_level": accuracy_level or None,
              "nodes_to_exclude": list(exclude)}
    if method == "rtn":
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric,
                                                accuracy_level=accuracy_level or None, bits=bits,
                                                op_types_to_quantize=("MatMul",))
    elif method == "hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=("MatMul",))
    elif method == "gptq":
        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_CalibrationReader(calibration or []),
                                             percdamp=gptq_damp, actorder=gptq_actorder,
                                             op_types_to_quantize=("MatMul",))
    elif method == "k-quant":
        custom = None
        if bits != 4:
            custom = {n.name: {"bits": bits} for n in model.graph.node if n.op_type == "MatMul"}
        algo = mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",), customized_weight_config=custom)
    else:  # pragma: no cover - the config validates the method
        raise BadInput(f"unknown weight-only method {method!r}; use one of {', '.join(METHODS)}")
    try:
        with quiet_ort():
            quantizer = mnq.MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=algo, **common)
            quantizer.process()
    except BadInput:
        raise
    except Exception as exc:  # ORT's quantizers raise assertion, value and runtime errors alike
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInput(f"ONNX Runtime's weight-only quantizer ({method}, {bits} bits) failed on this graph "
                       f"({reason}); try method rtn or another block size") from exc
    result = quantizer.model.model
    if accuracy_level:
        for node in result.graph.node:  # HQQ does not write the attribute
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                from onnx import helper

                node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    return result


def quantize_embedding_gather(model, gather: str, *, block: int, symmetric: bool) -> None:
    """The embedding Gather -> 4-bit GatherBlockQuantized, in place, with ORT's Gather quantizer
    (called per node: its whole-model path would force opset 21 onto an older graph)."""
    mnq = ort_quantizer_module()
    config = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=4,
                                              op_types_to_quantize=("Gather",))
    quantizer = mnq.DefaultWeightOnlyQuantizer(config)
    graph = model.graph
    nodes = list(graph.node)
    index = next(i for i, n in enumerate(nodes) if n.name == gather)
    with quiet_ort():
        replacement = quantizer.quantize(nodes[index], [graph])
    nodes[index:index + 1] = replacement
    graph.ClearField("node")
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    model.ir_version = max(model.ir_version, 10)  # 4-bit tensor types need IR 10
    _ensure_ms_opset(model)


def _ensure_ms_opset(model) -> None:
    from onnx import helper

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


# ---------------------------------------------------------------------------------------------
# Composing a graph from quantized copies, node by node
# ---------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """A fully quantized copy of the graph: for each candidate, the node that replaces it and the
    initializers that node reads (renamed with ``suffix`` so that copies never collide)."""

    label: str
    bits: int
    replacements: dict[str, tuple[Any, list[Any]]]

    @classmethod
    def of(cls, label: str, bits: int, original, quantized, candidates: Candidates, suffix: str = "") -> Variant:
        inits = {i.name: i for i in quantized.graph.initializer}
        producers = {o: n for n in quantized.graph.node for o in n.output}
        by_name = {n.name: n for n in original.graph.node}
        replacements: dict[str, tuple[Any, list[Any]]] = {}
        for name in candidates.nodes:
            node = producers.get(by_name[name].output[0])
            if node is None or node.op_type != "MatMulNBits":
                continue  # the quantizer skipped it (excluded, or a shape it does not take)
            node = copy.deepcopy(node)
            tensors = []
            for i, inp in enumerate(node.input):
                if inp in inits:
                    tensor = copy.deepcopy(inits[inp])
                    tensor.name = inp + suffix
                    node.input[i] = tensor.name
                    tensors.append(tensor)
            node.name = name + f"_Q{bits}"
            replacements[name] = (node, tensors)
        return cls(label, bits, replacements)


def compose(original, variants: dict[str, Variant], assignment: dict[str, str]):
    """A copy of ``original`` in which each node of ``assignment`` (name -> variant label, or
    ``float``) is replaced by that variant's MatMulNBits; unused float weights are dropped."""
    model = copy.deepcopy(original)
    graph = model.graph
    nodes = []
    extra = []
    for node in graph.node:
        label = assignment.get(node.name, "float")
        if label != "float" and node.name in variants[label].replacements:
            new, tensors = variants[label].replacements[node.name]
            nodes.append(copy.deepcopy(new))
            extra += tensors
        else:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(copy.deepcopy(t) for t in extra)
    drop_unused_initializers(graph)
    if any(n.op_type == "MatMulNBits" for n in graph.node):
        _ensure_ms_opset(model)
    return model


def drop_unused_initializers(graph) -> None:
    """Remove initializers no node (nor subgraph, nor graph output) reads: the replaced float weights."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | _subgraph_inputs(graph)
    keep = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


def _subgraph_inputs(graph) -> set[str]:
    """Names read inside If/Loop/Scan bodies (their outer-scope initializers must stay)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= {i for n in sub.node for i in n.input}
                names |= _subgraph_inputs(sub)
    return names


def save_graph(model, folder: Path) -> Path:
    """Write ``model`` as ``folder/model.onnx`` (tensors in ``model.onnx.data`` only above 2 GB)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ONNX_FILE
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=ONNX_FILE + ".data")
    else:
        onnx.save(model, str(path))
    return path


def copy_companions(source: Path, target: Path) -> None:
    """Config, generation config, tokenizer and other files of the parent; not its graph or record."""
    for f in source.iterdir():
        graph_file = f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data")
        if f.is_file() and not graph_file and f.name != META_FILE:
            shutil.copy2(f, target / f.name)


# ---------------------------------------------------------------------------------------------
# The accuracy-aware search
# ---------------------------------------------------------------------------------------------


class _Trials:
    """Writes composed graphs into one scratch folder and scores them against a reference."""

    def __init__(self, parent: OnnxModel, original, variants: dict[str, Variant], folder: Path):
        self.parent = parent
        self.original = original
        self.variants = variants
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        copy_companions(parent.folder, folder)
        self.evaluations = 0

    def score(self, assignment: dict[str, str], reference) -> dict[str, float]:
        from edgesmith.lm_quality import onnx_logits

        save_graph(compose(self.original, self.variants, assignment), self.folder)
        trial = OnnxModel(task=self.parent.task, name=self.parent.name, meta=copy.deepcopy(self.parent.meta),
                          folder=self.folder)
        self.evaluations += 1
        return reference.compare(onnx_logits(trial))


def search_fallback(parent: OnnxModel, original, variants: dict[str, Variant], candidates: Candidates,
                    base: dict[str, str], cfg: WeightOnlyConfig, work: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Return the assignment that holds ``max_kld`` with the fewest layer groups at the fallback
    precision, and the search's report. GateFailed when even all groups at the fallback miss it."""
    from edgesmith.lm_quality import Reference, calibration_batches, heldout_batches, onnx_logits

    assert cfg.max_kld is not None
    started = time.perf_counter()
    fallback = "int8" if cfg.fallback == "int8" and cfg.bits == 4 else "float"
    parent_fn = onnx_logits(parent)
    held_out = Reference.build(parent_fn, heldout_batches(parent.tokenizer))
    probe = Reference.build(parent_fn, calibration_batches(parent.tokenizer, count=cfg.probe_passages,
                                                           tokens=cfg.calibration_tokens, batch_size=cfg.probe_passages,
                                                           offset=PROBE_OFFSET))
    trials = _Trials(parent, original, variants, work / "trials")
    main = [n for n, label in base.items() if label == "main"]
    report: dict[str, Any] = {"max_kld": cfg.max_kld, "against": "parent graph", "fallback": fallback,
                              "probe_tokens": probe.tokens, "heldout_tokens": held_out.tokens}
    full = trials.score(base, held_out)
    report["all_quantized"] = _rounded(full)
    if full["kld"] <= cfg.max_kld:
        report.update({"groups_at_fallback": {}, "final": report["all_quantized"], "evaluations": trials.evaluations,
                       "seconds": round(time.perf_counter() - started, 2)})
        return base, report
    groups = sorted({candidates.groups[n] for n in main})
    costs = {}
    for group in groups:
        only = {n: ("main" if candidates.groups[n] == group else "float") for n in main}
        costs[group] = trials.score(only, probe)["kld"]
    ranked = sorted(groups, key=lambda g: costs[g], reverse=True)

    def assignment_with(k: int) -> dict[str, str]:
        chosen = set(ranked[:k])
        return {n: (fallback if n in main and candidates.groups[n] in chosen else label) for n, label in base.items()}

    measured: dict[int, dict[str, float]] = {0: full}

    def holds(k: int) -> bool:
        if k not in measured:
            measured[k] = trials.score(assignment_with(k), held_out)
        return measured[k]["kld"] <= cfg.max_kld

    # the smallest k that holds: double until one holds, then bisect (KL falls as groups return)
    low, k = 0, 1
    while k < len(ranked) and not holds(k):
        low, k = k, min(2 * k, len(ranked))
    if k >= len(ranked) and not holds(len(ranked)):
        worst = measured[len(ranked)]["kld"]
        how = ("fallback: float, or " if fallback == "int8" else "") + "a larger max_kld"
        raise GateFailed(f"weight-only {cfg.precision} ({cfg.method}): even with every layer group at {fallback} the KL "
                         f"divergence to the parent is {worst:.4g} > max_kld {cfg.max_kld:g}; use {how}",
                         failures=[{"metric": "kld", "value": worst, "limit": cfg.max_kld}])
    high = k
    while high - low > 1:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid
    if fallback == "float" and high == len(ranked):
        raise GateFailed(f"weight-only {cfg.precision} ({cfg.method}): no layer group can be quantized within max_kld "
                         f"{cfg.max_kld:g} (all quantized: KL {full['kld']:.4g}); raise max_kld")
    kept = ranked[:high]
    report.update({
        "ranking": "KL on probe passages with only that group quantized, rest float",
        "group_costs": {g: round(costs[g], 6) for g in ranked},
        "groups_at_fallback": {g: {"precision": fallback, "nodes": candidates.members(g),
                                   "kld_if_quantized": round(costs[g], 6)} for g in kept},
        "final": _rounded(measured[high]), "evaluations": trials.evaluations,
        "seconds": round(time.perf_counter() - started, 2)})
    log.info("accuracy-aware %s: %d of %d layer groups at %s for KL %.4g <= %g (%d evaluations)", cfg.precision,
             high, len(ranked), fallback, measured[high]["kld"], cfg.max_kld, trials.evaluations)
    return assignment_with(high), report


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def quantize_weight_only(model: OnnxModel, config: WeightOnlyConfig | dict, ctx: Context | None = None) -> OnnxModel:
    """Weight-only quantize ``model`` into a new folder (``ctx.scratch``); the report goes into
    ``ctx.report`` and, summarized, into the result's ``meta["quantization"]``."""
    import onnx

    from edgesmith.lm_quality import lm_fidelity

    cfg = config if isinstance(config, WeightOnlyConfig) else make_config(WeightOnlyConfig, dict(config),
                                                                         where="weight-only quantization")
    ctx = ctx or Context()
    started = time.perf_counter()
    folder = ctx.scratch("weight-only")
    work = ctx.scratch("weight-only-work")
    try:
        try:
            original = onnx.load(str(model.path))
        except Exception as exc:
            raise BadInput(f"{model.path}: cannot read it as ONNX ({str(exc).splitlines()[0][:200]})") from exc
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
        if cfg.method == "gptq" and not is_decoder:
            raise BadInput(f"method gptq calibrates on token passages in the decoder layout; {model.name} is a "
                           f"{model.task} model (use method rtn or hqq)")
        excluded = [] if cfg.quantize_lm_head or candidates.lm_head is None else [candidates.lm_head]
        report: dict[str, Any] = {"mode": "gguf-repack" if cfg.method == "gguf" else f"{cfg.precision}-weight",
                                  "method": cfg.method, "accuracy_level": cfg.accuracy_level,
                                  "size_before": model.size_bytes()}
        if transposed:
            report["transposed_weights_materialized"] = transposed
        if cfg.method == "gguf":
            quantized_proto, precisions, embedding = _repack_graph(original, candidates, excluded, cfg, report)
        else:
            report.update({"bits": cfg.bits, "block": cfg.block,
                           "symmetric": cfg.symmetric if cfg.method != "hqq" else False})
            if cfg.method == "hqq":
                report["float_zero_points"] = True
                log.warning("hqq writes float zero points, which take ONNX Runtime's slow MatMulNBits kernel on the "
                            "CPU (SmolLM2 one-token forward 1.2 s vs 0.04 s for rtn); prefer rtn, k-quant or gptq")
            quantized_proto, precisions, embedding = _quantize_graph(model, original, candidates, excluded, cfg,
                                                                     report, work)
        quantize_seconds = time.perf_counter() - started
        save_graph(quantized_proto, folder)
        del quantized_proto
        copy_companions(model.folder, folder)
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
        report["quantize_seconds"] = round(quantize_seconds, 2)
        if is_decoder:
            final = (report.get("fallback") or {}).get("final")
            # the search measured exactly this graph on the held-out passages, unless the embedding changed since
            report["fidelity"] = final if final and not cfg.embedding else _rounded(
                lm_fidelity(result, model, tokenizer=model.tokenizer))
        report["seconds"] = round(time.perf_counter() - started, 2)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.report.update(report)
    log.info("weight-only %s (%s): %.1f MB -> %.1f MB%s", meta["precision"], cfg.method,
             report["size_before"] / 1e6, report["size_after"] / 1e6,
             f", KL {report['fidelity']['kld']:.4g}, top-1 {report['fidelity']['top1']:.4f}" if "fidelity" in report else "")
    return result


def _precision(by_precision: dict[str, list[str]]) -> str:
    """``int4``, ``int4+int8``, ``int4+float``...: the precisions of the weight MatMuls, widest last."""
    return "+".join(p for p in ("int4", "int8", "float") if by_precision.get(p))


def _quantize_graph(model: OnnxModel, original, candidates: Candidates, excluded: list[str], cfg: WeightOnlyConfig,
                    report: dict[str, Any], work: Path) -> tuple[Any, dict[str, str], str]:
    """ORT's quantizer (and the accuracy-aware search): the graph, each candidate's precision, the embedding's."""
    calibration = calibration_feeds(model, original.graph, cfg) if cfg.method == "gptq" else None
    variants = {"main": Variant.of(cfg.method, cfg.bits, original, ort_quantize(
        original, bits=cfg.bits, block=cfg.block, method=cfg.method, symmetric=cfg.symmetric,
        accuracy_level=cfg.accuracy_level, exclude=excluded, calibration=calibration,
        gptq_damp=cfg.gptq_damp, gptq_actorder=cfg.gptq_actorder), candidates)}
    base = {n: ("main" if n in variants["main"].replacements and n not in excluded else "float")
            for n in candidates.nodes}
    if not any(label == "main" for label in base.values()):
        raise BadInput(f"{model.path}: ONNX Runtime's quantizer took none of the {len(candidates.nodes)} MatMul "
                       "weights; check that K and N are at least the block size")
    assignment = base
    if cfg.max_kld is not None:
        if cfg.bits == 4 and cfg.fallback == "int8":
            variants["int8"] = Variant.of("rtn", 8, original, ort_quantize(
                original, bits=8, block=cfg.block, method="rtn", symmetric=cfg.symmetric,
                accuracy_level=cfg.accuracy_level, exclude=excluded), candidates, suffix="_int8")
        assignment, report["fallback"] = search_fallback(model, original, variants, candidates, base, cfg, work)
    quantized = compose(original, variants, assignment)
    embedding = "float"
    if cfg.embedding and candidates.embedding:
        quantize_embedding_gather(quantized, candidates.embedding, block=cfg.block, symmetric=cfg.symmetric)
        embedding = "int4"
    labels = {"main": cfg.precision, "int8": "int8", "float": "float"}
    return quantized, {n: labels[assignment[n]] for n in candidates.nodes}, embedding


def _repack_graph(original, candidates: Candidates, excluded: list[str], cfg: WeightOnlyConfig,
                  report: dict[str, Any]) -> tuple[Any, dict[str, str], str]:
    """The GGUF's own blocks, repacked exactly: the graph, each candidate's precision, the embedding's."""
    from edgesmith.gguf.repack import repack

    assert cfg.gguf_file is not None
    quantized, info = repack(original, cfg.gguf_file, accuracy_level=cfg.accuracy_level, embedding=cfg.embedding,
                             exclude=set(excluded))
    bits = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}
    report["gguf"] = {"file": str(cfg.gguf_file), "types": info["types"], "permuted": info["permuted"],
                      "blocksum_branches": info["blocksum_branches"], "not_matched": info["float"]}
    precisions = {n: bits[info["matched"][n]["type"]] if n in info["matched"] else "float" for n in candidates.nodes}
    embedding = "float"
    if candidates.embedding and candidates.embedding in info["matched"]:
        embedding = bits[info["matched"][candidates.embedding]["type"]]
    return quantized, precisions, embedding
