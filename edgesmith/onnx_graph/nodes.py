"""Reading an ONNX graph's nodes (weight nodes, source modules, FFN down-projections, 8-bit weights).

Weight nodes and where their weight sits, the torch module a node came from, FFN down-projections,
which weights a quantizer made 8-bit, and node names.

Pure graph reading (onnx, numpy); the quantize pass (:mod:`edgesmith.compress.quantization`) selects,
reports and returns nodes to float with these.
"""

from __future__ import annotations

#: which input of each op type holds its weight
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Attention": 1, "LSTM": 1, "Gather": 0,
                "EmbedLayerNormalization": 2}
#: op types whose output feeds an FFN down-projection
ACTIVATION_FUNCTIONS = ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Relu", "Erf", "Tanh", "Sigmoid", "Mul")


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


def strip_node_metadata(graph) -> int:
    """Drop every node's ``metadata_props`` (the dynamo exporter's module paths and FX provenance:
    about 275 kB in MiniLM) and doc strings; returns the bytes of text removed. The quantize pass
    reads the module paths from its input graph, so its output no longer needs them."""
    removed = 0
    for node in graph.node:
        removed += sum(len(p.key) + len(p.value) for p in node.metadata_props) + len(node.doc_string)
        del node.metadata_props[:]
        node.doc_string = ""
    return removed


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
