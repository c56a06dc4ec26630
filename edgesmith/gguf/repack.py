"""The exact route from a GGUF to ONNX Runtime's 4-bit kernels: repack the GGUF's own blocks.

transformers reads a Q4_0/Q4_1 GGUF by dequantizing every block to FP32; quantizing that FP32
graph again (RTN, HQQ, GPTQ) adds a second rounding on top of llama.cpp's (ORT GenAI's builder
INT4 of SmolLM2 left the source's greedy text after 21 tokens). Here each MatMul whose weight is,
value for value, a dequantized GGUF tensor becomes a ``MatMulNBits`` that reads the GGUF's own
codes and scales, so the weights are the source's exactly (FIELD-NOTES § Decoders, ORT 1.32):

- Q4_0 (``w = d * (q - 8)``): MatMulNBits, 4 bits, block 32, no zero points (the default is 8).
- Q4_1 (``w = d * q + m``): float zero points (``-m/d``) are exact but take a kernel 20x slower at
  M = 1, so: MatMulNBits with zero point 0 (``A @ (d*q)``) plus the min term as a side branch,
  ``blocksum(A) @ M`` (``blocksum`` = the sum of A over each block of 32 along K; M = the
  [K/32, N] block minima), then Add. The block sums of one input are shared by every MatMul that
  reads it (q/k/v, gate/up).
- Q8_0 (``w = d * q``, int8 q; llama.cpp's choice for SmolLM2's tied embedding): MatMulNBits,
  8 bits, codes shifted by 128 (the default zero point); an embedding Gather on such a table
  becomes a ``GatherBlockQuantized`` (uint8, bits 8) — also Q4_0 tables (bits 4).

Nibble order (the trap): a GGUF Q4 block stores element j in the low nibble and j + 16 in the
high nibble of byte j; MatMulNBits packs elements 2j, 2j+1 in byte j, low nibble first.

Matching is by values, never by names: transformers permutes the rows of Llama q/k projections
when it reads a GGUF (``LlamaTensorProcessor._reverse_permute_weights``; heads x (dim/2, 2) ->
heads x (2, dim/2)), and an exporter may rename or transpose weights. Every dequantized GGUF row
is hashed; a graph weight [K, N] matches a GGUF tensor [N, K] when each of its N columns equals a
row of that tensor bit for bit, which gives the row permutation directly (whole rows move, so the
32-element blocks along K survive it). Only the error of ``accuracy_level`` remains: level 4
quantizes the activations to int8 per block (relative error ~5e-3, like llama.cpp's Q8
activations); level 0 computes in float (1e-5).

Measured on SmolLM2-135M-Instruct Q4_1 (210 Q4_1 matrices, the tied embedding Q8_0): every one
of the 211 MatMuls and the embedding Gather matched (60 q/k permuted) in ~8 s; 653 MB FP32 graph
-> 147 MB; KL to the FP32 graph on 540 held-out tokens 0.0186 (top-1 0.898) at accuracy level 4,
below 1e-5 (top-1 1.0) at level 0, where RTN INT4 of the same FP32 weights costs 0.466.

Layer L1: imports numpy, onnx, gguf, edgesmith.errors, edgesmith.gguf.file and edgesmith.onnx_graph.edit only.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import BadInput
from edgesmith.gguf.file import open_gguf
from edgesmith.onnx_graph.edit import MS_DOMAIN, drop_unused_initializers, ensure_ms_opset

log = logging.getLogger(__name__)

BLOCK = 32
#: bytes per 32-element block: fp16 scale (+ fp16 min for Q4_1) and the codes
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
SUPPORTED = tuple(BLOCK_BYTES)
#: what each repackable type's codes become (MatMulNBits bits), as a precision name
PRECISION = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}


# ---------------------------------------------------------------------------------------------
# GGUF blocks
# ---------------------------------------------------------------------------------------------


@dataclass
class GgufWeight:
    """One 2-D GGUF tensor in a repackable format: ``rows`` output features, ``cols`` input
    features (K, the blocked axis), ``blocks`` the raw bytes, uint8 [rows, cols / 32 * bytes]."""

    name: str
    qtype: str
    rows: int
    cols: int
    blocks: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], as gguf (and so transformers) dequantizes it."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(self.blocks, GGMLQuantizationType[self.qtype]).reshape(self.rows, self.cols)


def read_weights(path: str | Path) -> list[GgufWeight]:
    """The Q4_0, Q4_1 and Q8_0 matrices of a GGUF file (other types are not repackable)."""
    weights = []
    for tensor in open_gguf(path).tensors:
        qtype = tensor.tensor_type.name
        if qtype not in SUPPORTED or len(tensor.shape) != 2:
            continue
        cols, rows = (int(d) for d in tensor.shape)  # GGUF lists dims fastest first
        data = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1)
        weights.append(GgufWeight(tensor.name, qtype, rows, cols, data))
    return weights


def from_blocks(name: str, qtype: str, blocks: np.ndarray, rows: int, cols: int) -> GgufWeight:
    """A :class:`GgufWeight` from raw block bytes (e.g. ``gguf.quants.quantize`` output)."""
    if qtype not in SUPPORTED:
        raise BadInput(f"{name}: GGUF type {qtype} cannot be repacked exactly; supported: {', '.join(SUPPORTED)}")
    if cols % BLOCK:
        raise BadInput(f"{name}: {cols} input features are not a multiple of the GGUF block ({BLOCK})")
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(rows, -1)
    if blocks.shape[1] != cols // BLOCK * BLOCK_BYTES[qtype]:
        raise BadInput(f"{name}: {blocks.shape[1]} bytes per row, expected {cols // BLOCK * BLOCK_BYTES[qtype]} for {qtype}")
    return GgufWeight(name, qtype, rows, cols, blocks)


@dataclass
class NBits:
    """MatMulNBits' inputs for one weight (N = rows, K = cols): ``packed`` uint8 [N, K/32, blob],
    ``scales`` float32 [N, K/32], ``zero_points`` packed uint8 or None (the default: 8 for 4 bits,
    128 for 8), ``mins`` float32 [N, K/32] (Q4_1's min term, applied by the side branch) or None."""

    bits: int
    n: int
    k: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None
    mins: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: what the kernel multiplies with (plus the min term)."""
        blocks = self.k // BLOCK
        if self.bits == 4:
            codes = np.empty((self.n, blocks, BLOCK), dtype=np.float32)
            codes[..., 0::2] = self.packed & 0x0F
            codes[..., 1::2] = self.packed >> 4
            zero = 0.0 if self.zero_points is not None else 8.0  # only all-zero points are written
        else:
            codes = self.packed.astype(np.float32)
            zero = 128.0
        w = (codes - zero) * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(self.n, self.k).astype(np.float32)


def to_nbits(weight: GgufWeight, rows: np.ndarray | None = None) -> NBits:
    """MatMulNBits' inputs holding exactly ``weight``'s blocks (rows reordered by ``rows``)."""
    blocks = weight.blocks if rows is None else weight.blocks[rows]
    n, nb = blocks.shape[0], weight.cols // BLOCK
    b = blocks.reshape(n, nb, BLOCK_BYTES[weight.qtype])
    scales = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if weight.qtype == "Q8_0":
        codes = b[..., 2:].view(np.int8).astype(np.int16) + 128
        return NBits(8, n, weight.cols, codes.astype(np.uint8), scales)
    qs = b[..., 4:] if weight.qtype == "Q4_1" else b[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # GGUF: byte j = elements j (low), j + 16 (high)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # MatMulNBits: 2j (low), 2j + 1 (high)
    if weight.qtype == "Q4_0":
        return NBits(4, n, weight.cols, packed, scales)
    mins = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    # Centred codes: MatMulNBits' default zero point 8 computes A @ (d * (q - 8)) and the side branch
    # adds blocksum(A) @ (m + 8d): the same weights, but accuracy level 4's int8 activation error is
    # then multiplied by d * (q - 8), about w (as in llama.cpp's Q4_1 x Q8_1 dot product), not by
    # d * q, twice as large: SmolLM2 KL to FP32 0.0037 against 0.0168 (llama.cpp 0.0033), same speed.
    shifted = mins + 8.0 * scales
    if np.array_equal(shifted - 8.0 * scales, mins):  # fp16 m and d: exact unless |m| >> 8d in some block
        return NBits(4, n, weight.cols, packed, scales, None, shifted)
    zero_points = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
    return NBits(4, n, weight.cols, packed, scales, zero_points, mins)


# ---------------------------------------------------------------------------------------------
# Matching graph weights to GGUF tensors by value
# ---------------------------------------------------------------------------------------------


@dataclass
class Match:
    """A graph weight that is a GGUF tensor: which, and the GGUF row of each output column."""

    weight: GgufWeight
    rows: np.ndarray

    @property
    def permuted(self) -> bool:
        return not np.array_equal(self.rows, np.arange(len(self.rows)))


@dataclass
class RowIndex:
    """Hashes of every dequantized GGUF row: hash -> {tensor index: row}."""

    weights: list[GgufWeight]
    rows: dict[int, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))

    @classmethod
    def build(cls, weights: list[GgufWeight]) -> RowIndex:
        index = cls(weights)
        for t, weight in enumerate(weights):
            values = weight.dequantize()
            for r in range(weight.rows):
                index.rows[hash(values[r].tobytes())].setdefault(t, r)
        return index

    def match(self, matrix: np.ndarray) -> Match | None:
        """The GGUF tensor whose rows are exactly the rows of ``matrix`` [N, K] (float32), in some order."""
        n, k = matrix.shape
        keys = [hash(matrix[r].tobytes()) for r in range(n)]
        first = self.rows.get(keys[0], {})
        for t in first:
            weight = self.weights[t]
            if (weight.rows, weight.cols) != (n, k):
                continue
            rows = np.empty(n, dtype=np.int64)
            for r, key in enumerate(keys):
                found = self.rows.get(key, {}).get(t)
                if found is None:
                    break
                rows[r] = found
            else:
                values = weight.dequantize()
                if np.array_equal(values[rows], matrix):
                    if np.array_equal(values, matrix):  # duplicate rows (unused tokens) hash alike
                        rows = np.arange(n)
                    return Match(weight, rows)
        return None


# ---------------------------------------------------------------------------------------------
# Rewriting the graph
# ---------------------------------------------------------------------------------------------


class _Builder:
    """Adds nodes and initializers with unique names; shares block sums per activation."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.names = {n.name for n in self.graph.node} | {i.name for i in self.graph.initializer}
        self.names |= {o for n in self.graph.node for o in n.output}
        self.blocksums: dict[str, str] = {}
        self.indicators: dict[int, str] = {}
        self.new_inits: list[Any] = []

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def initializer(self, base: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(base)
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def blocksum(self, activation: str, k: int) -> tuple[str, list[Any]]:
        """``activation @ S`` with S the [K, K/32] 0/1 block indicator: the sum over each block
        (rank-agnostic, one small float MatMul shared by every weight that reads ``activation``)."""
        from onnx import helper

        if activation in self.blocksums:
            return self.blocksums[activation], []
        if k not in self.indicators:
            indicator = np.zeros((k, k // BLOCK), dtype=np.float32)
            indicator[np.arange(k), np.arange(k) // BLOCK] = 1.0
            self.indicators[k] = self.initializer(f"gguf_block_indicator_{k}", indicator)
        out = self.unique(activation + "_gguf_blocksum")
        node = helper.make_node("MatMul", [activation, self.indicators[k]], [out], name=self.unique(out + "_MatMul"))
        self.blocksums[activation] = out
        return out, [node]


def _matmul_nodes(builder: _Builder, node, nbits: NBits, weight_name: str, accuracy_level: int) -> list[Any]:
    from onnx import helper

    activation, output = node.input[0], node.output[0]
    packed = builder.initializer(weight_name + "_gguf_q", nbits.packed)
    scales = builder.initializer(weight_name + "_gguf_scales", nbits.scales)
    inputs = [activation, packed, scales]
    if nbits.zero_points is not None:
        inputs.append(builder.initializer(weight_name + "_gguf_zero_points", nbits.zero_points))
    attrs = {"K": nbits.k, "N": nbits.n, "bits": nbits.bits, "block_size": BLOCK}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    main_out = output if nbits.mins is None else builder.unique(output + "_gguf_scaled")
    nodes = [helper.make_node("MatMulNBits", inputs, [main_out], name=builder.unique(node.name + "_gguf"),
                              domain=MS_DOMAIN, **attrs)]
    if nbits.mins is not None:
        sums, extra = builder.blocksum(activation, nbits.k)
        mins = builder.initializer(weight_name + "_gguf_mins", nbits.mins.T)  # [K/32, N]
        min_out = builder.unique(output + "_gguf_min_term")
        nodes += extra + [helper.make_node("MatMul", [sums, mins], [min_out], name=builder.unique(min_out + "_MatMul")),
                          helper.make_node("Add", [main_out, min_out], [output], name=builder.unique(output + "_gguf_add"))]
    return nodes


def _gather_node(builder: _Builder, node, weight: GgufWeight, data_name: str) -> list[Any] | None:
    """An embedding Gather over a Q8_0 or Q4_0 table -> GatherBlockQuantized on the GGUF codes."""
    from onnx import helper

    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if axis != 0 or weight.qtype == "Q4_1":
        return None  # GatherBlockQuantized has no float min term
    nbits = to_nbits(weight)
    data = nbits.packed.reshape(weight.rows, -1)  # [vocab, hidden] (8 bits) or [vocab, hidden / 2] (4 bits)
    packed = builder.initializer(data_name + "_gguf_q", data)
    scales = builder.initializer(data_name + "_gguf_scales", nbits.scales)
    return [helper.make_node("GatherBlockQuantized", [packed, node.input[1], scales], [node.output[0]],
                             name=builder.unique(node.name + "_gguf"), domain=MS_DOMAIN, gather_axis=0,
                             quantize_axis=1, block_size=BLOCK, bits=nbits.bits)]


def repack(model, weights: list[GgufWeight] | str | Path, *, accuracy_level: int = 4,
           embedding: bool = True, exclude: set[str] | frozenset[str] = frozenset()) -> tuple[Any, dict[str, Any]]:
    """Replace every MatMul (and, with ``embedding``, every axis-0 Gather) whose constant float32
    weight equals a dequantized GGUF tensor with ONNX Runtime's quantized op on that tensor's own
    blocks. ``model``: an ONNX ModelProto (not modified); ``weights``: a GGUF path or
    :func:`read_weights`' list; ``exclude``: node names to leave as they are. Returns the new ModelProto and a report (matched nodes with their
    GGUF tensor, type and whether rows were permuted; MatMuls left float)."""
    from onnx import numpy_helper

    if not isinstance(weights, list):
        weights = read_weights(weights)
    if not weights:
        raise BadInput("the GGUF has no Q4_0, Q4_1 or Q8_0 matrix to repack; use weight-only quantization instead")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise BadInput(f"accuracy_level must be 0-4 (MatMulNBits' attribute), not {accuracy_level}")
    index = RowIndex.build(weights)
    model = copy.deepcopy(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    builder = _Builder(model)
    report: dict[str, Any] = {"matched": {}, "float": {}, "types": {}}
    cache: dict[str, Match | None] = {}
    nodes = []
    for node in graph.node:
        weight_input = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        init = inits.get(node.input[weight_input]) if weight_input is not None else None
        if (init is None or len(init.dims) != 2 or node.name in exclude
                or (node.op_type == "Gather" and not embedding)):
            nodes.append(node)
            continue
        if init.data_type != 1:
            if node.op_type == "MatMul":
                report["float"][node.name] = "weight is not float32"
            nodes.append(node)
            continue
        if init.name not in cache:
            array = numpy_helper.to_array(init)
            matrix = np.ascontiguousarray(array.T if node.op_type == "MatMul" else array, dtype=np.float32)
            cache[init.name] = index.match(matrix)
        found = cache[init.name]
        if found is None:
            if node.op_type == "MatMul":
                report["float"][node.name] = "no GGUF tensor has these values"
            nodes.append(node)
            continue
        if node.op_type == "Gather":
            if found.permuted:
                nodes.append(node)
                continue
            replacement = _gather_node(builder, node, found.weight, init.name)
            if replacement is None:
                nodes.append(node)
                continue
        else:
            replacement = _matmul_nodes(builder, node, to_nbits(found.weight, found.rows), init.name, accuracy_level)
        nodes += replacement
        report["matched"][node.name] = {"gguf": found.weight.name, "type": found.weight.qtype,
                                        "op": replacement[0].op_type, "permuted": found.permuted}
        report["types"][found.weight.qtype] = report["types"].get(found.weight.qtype, 0) + 1
    if not report["matched"]:
        raise BadInput("no weight of the graph equals a tensor of the GGUF (was the graph exported from the model "
                       "transformers dequantized from this very file, in float32?)")
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(builder.new_inits)
    drop_unused_initializers(graph)
    ensure_ms_opset(model)
    report["permuted"] = sorted(n for n, m in report["matched"].items() if m["permuted"])
    report["blocksum_branches"] = len(builder.blocksums)
    report["accuracy_level"] = accuracy_level
    log.info("repacked %d weights from the GGUF (%s); %d MatMuls left float", len(report["matched"]),
             ", ".join(f"{v} {k}" for k, v in sorted(report["types"].items())), len(report["float"]))
    return model, report
