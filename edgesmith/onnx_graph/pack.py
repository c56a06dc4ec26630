"""Pack the 4-bit projections that read one input into one ``MatMulNBits`` (q/k/v, gate/up).

ORT GenAI's builder writes a Llama layer's q, k and v as one MatMulNBits (N = q + 2 kv) feeding
GroupQueryAttention's packed-QKV input; edgesmith's genai export keeps them apart so that a GGUF
repack can match each weight to one GGUF tensor by value (:mod:`edgesmith.gguf.repack`). After the
weights are quantized the three are packed here, and gate/up likewise (one MatMulNBits and a
Split). A decoded token on a CPU is many small kernels: SmolLM2 runs 211 MatMulNBits a token unpacked,
121 packed.

Packing concatenates along N, which is exact: MatMulNBits computes every output column from its own
row of ``B`` (blocks along K), its own scales and zero points, and the same int8-quantized blocks of
``A`` — the packed node's columns are the separate nodes' columns, bit for bit (tested).

Nodes pack when they read the same ``A`` and agree on K, bits, block_size and accuracy_level, have
constant ``B``/``scales`` (and zero points, all or none), and no ``g_idx`` or ``bias``. Where the
packed outputs are exactly a GroupQueryAttention's query, key and value (in that order, nothing
else reading them), the packed output feeds its query input and key/value are left empty — the
op's packed-QKV form; otherwise a Split restores the original outputs.

Layer L1: imports numpy and onnx only.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def _attrs(node) -> dict[str, int]:
    return {a.name: int(a.i) for a in node.attribute if a.name in (*_ATTRS, "N")}


def _packable(node, inits: dict[str, Any]) -> bool:
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return False
    extra = [n for n in node.input[4:] if n]  # g_idx, bias
    constant = all(name in inits for name in node.input[1:4] if name)
    return not extra and constant and len(node.input) >= 3


def _groups(graph, inits: dict[str, Any]) -> list[list[Any]]:
    """Lists of two or more packable nodes reading one input with the same attributes, in graph order."""
    by_key: dict[tuple, list[Any]] = defaultdict(list)
    for node in graph.node:
        if _packable(node, inits):
            attrs = _attrs(node)
            has_zp = len(node.input) > 3 and bool(node.input[3])
            by_key[(node.input[0], has_zp, *(attrs.get(k) for k in _ATTRS))].append(node)
    return [nodes for nodes in by_key.values() if len(nodes) > 1]


def _concat(inits: dict[str, Any], names: list[str], rows: list[int]) -> np.ndarray:
    """Concatenate constant tensors along N (their first axis, after reshaping flat ones to [N, -1])."""
    from onnx import numpy_helper

    arrays = [numpy_helper.to_array(inits[name]) for name in names]
    return np.concatenate([a.reshape(n, -1) for a, n in zip(arrays, rows)], axis=0)


def _gqa_consumer(graph, outputs: list[str]):
    """The GroupQueryAttention whose query, key, value are exactly ``outputs`` (read by nothing
    else), or None."""
    if len(outputs) != 3:
        return None
    readers = [n for n in graph.node if any(o in n.input for o in outputs)]
    if len(readers) != 1 or readers[0].op_type != "GroupQueryAttention":
        return None
    gqa = readers[0]
    return gqa if list(gqa.input[:3]) == outputs else None


def _readers(graph, name: str) -> list[Any]:
    return [n for n in graph.node if name in n.input]


def _side_branches(graph, group: list[Any], inits: dict[str, Any]) -> list[tuple[Any, Any]] | None:
    """For a GGUF Q4_1 repack (:mod:`edgesmith.gguf.repack`), each member's min term: ``Add(member,
    MatMul(blocksum, mins))`` with one shared blocksum and constant [K/32, N] mins, each output read
    by that Add only. Returns [(add, matmul)] per member, or None when the group has no such branch."""
    branches = []
    for node in group:
        readers = _readers(graph, node.output[0])
        if len(readers) != 1 or readers[0].op_type != "Add":
            return None
        add = readers[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        producer = next((n for n in graph.node if other in n.output), None)
        if (producer is None or producer.op_type != "MatMul" or producer.input[1] not in inits
                or len(_readers(graph, other)) != 1):
            return None
        branches.append((add, producer))
    if len({mm.input[0] for _, mm in branches}) != 1:
        return None
    return branches


def _pack_side_branches(graph, inits: dict[str, Any], branches: list[tuple[Any, Any]], base: str,
                        packed_out: str) -> tuple[list[Any], str, list[str]]:
    """One min-term MatMul over the concatenated mins and one Add for the packed node: the new
    nodes, the packed sum's name, and the members' former outputs (the Adds' outputs)."""
    from onnx import helper, numpy_helper

    mins = np.concatenate([numpy_helper.to_array(inits[mm.input[1]]) for _, mm in branches], axis=1)
    tensor = numpy_helper.from_array(np.ascontiguousarray(mins), f"{base}/mins")
    graph.initializer.append(tensor)
    outputs = [add.output[0] for add, _ in branches]
    for add, matmul in branches:
        graph.node.remove(add)
        graph.node.remove(matmul)
    nodes = [helper.make_node("MatMul", [branches[0][1].input[0], tensor.name], [f"{base}/min_term"],
                              name=f"{base}/MinMatMul"),
             helper.make_node("Add", [packed_out, f"{base}/min_term"], [f"{base}/sum"], name=f"{base}/Add")]
    return nodes, f"{base}/sum", outputs


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs (stable:
    nodes keep their order where they can)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or an undefined input at node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def pack_matmulnbits(model) -> dict[str, Any]:
    """Pack, in place, every group of MatMulNBits sharing an input (see the module docstring).
    Returns ``{"packed": [[node names], ...], "nodes_before": n, "nodes_after": n}``."""
    from onnx import helper, numpy_helper

    graph = model.graph
    before = len(graph.node)
    inits = {i.name: i for i in graph.initializer}
    report: dict[str, Any] = {"packed": [], "nodes_before": before}
    for group in _groups(graph, inits):
        ns = [_attrs(n)["N"] for n in group]
        first = group[0]
        base = first.name + "_packed"
        inputs = [first.input[0]]
        for index, suffix in ((1, "B"), (2, "scales"), (3, "zero_points")):
            if len(first.input) <= index or not first.input[index]:
                continue
            joined = _concat(inits, [n.input[index] for n in group], ns)
            source = numpy_helper.to_array(inits[first.input[index]])
            shaped = joined.reshape((-1, *source.shape[1:])) if source.ndim > 1 else joined.reshape(-1)
            tensor = numpy_helper.from_array(shaped.astype(source.dtype), f"{base}/{suffix}")
            graph.initializer.append(tensor)
            inputs.append(tensor.name)
        attrs = {**{k: v for k, v in _attrs(first).items() if k != "N"}, "N": int(sum(ns))}
        packed_out = f"{base}/output"
        packed = helper.make_node("MatMulNBits", inputs, [packed_out], name=base, domain="com.microsoft", **attrs)
        branches = _side_branches(graph, group, inits)
        outputs = [n.output[0] for n in group]
        position = list(graph.node).index(first)
        for node in group:
            graph.node.remove(node)
        new_nodes = [packed]
        if branches is not None:  # a Q4_1 repack: one min term and one Add for the packed node
            extra, packed_out, outputs = _pack_side_branches(graph, inits, branches, base, packed_out)
            new_nodes += extra
            position = min(position, len(graph.node))
        gqa = _gqa_consumer(graph, outputs)
        if gqa is not None:
            gqa.input[0], gqa.input[1], gqa.input[2] = packed_out, "", ""
        else:
            split = numpy_helper.from_array(np.array(ns, dtype=np.int64), f"{base}/split")
            graph.initializer.append(split)
            new_nodes.append(helper.make_node("Split", [packed_out, split.name], outputs, name=f"{base}/Split", axis=-1))
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        report["packed"].append([n.name for n in group])
    used = {name for node in graph.node for name in node.input} | {g.name for g in graph.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if report["packed"]:
        _toposort(graph)
    report["nodes_after"] = len(graph.node)
    log.info("packed %d groups of MatMulNBits: %d nodes -> %d", len(report["packed"]), before, report["nodes_after"])
    return report
