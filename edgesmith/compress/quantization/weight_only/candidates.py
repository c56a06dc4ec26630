"""The graph's weights to quantize: MatMuls with a constant 2-D float weight, the LM head, the embedding
Gather, and each node's layer group (what the accuracy-aware search returns to a higher precision)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edgesmith.artifacts import OnnxModel

LAYER_INDEX = re.compile(r"(?:^|[./_ ])(?:layers|layer|h|blocks|block)[./_](\d+)(?=[./_:]|$)")
FLOAT_TYPES = (1, 10, 16)  # FLOAT, FLOAT16, BFLOAT16


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


def vocab_size(model: OnnxModel) -> int | None:
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
