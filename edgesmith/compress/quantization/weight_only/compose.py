"""Composing a graph from fully quantized copies, node by node.

ORT's quantizers rewrite a whole graph at once; the accuracy-aware search wants any mix of
precisions per node. Each precision's copy is taken apart once (:class:`Variant`: the node that
replaces each candidate and the initializers it reads) and :func:`compose` puts any assignment
together. ORT's GPTQ measures each MatMul's inputs on the float graph, so a node's quantized weight
does not depend on which others are quantized, and the composition is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from edgesmith.compress.quantization.weight_only.candidates import Candidates
from edgesmith.onnx_graph.edit import drop_unused_initializers, ensure_ms_opset


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
        ensure_ms_opset(model)
    return model
