"""A decoder graph's LM head, and the tied embedding read through a Transpose.

A causal LM that ties its embedding and LM head stores one matrix; exporters then read it through
a ``Transpose`` on one side. The dynamo exporter stores the [vocab, hidden] table and gives the LM
head ``MatMul(x, Transpose(E))``; ORT GenAI's builder stores the LM head's [hidden, vocab] weight and
gives the embedding ``Gather(Transpose(W), ids)``. Quantizers want a constant weight on the MatMul
(:func:`materialize_transposed_weights`) and the embedding and LM head as the usual pair
(:func:`untie_embedding_transpose`). A ``logits_to_keep`` input before the head is optional with
Hugging Face's keep-everything default (:func:`keep_all_logits_by_default`).

Layer L1: imports onnx, numpy and edgesmith.onnx_graph.edit only.
"""

from __future__ import annotations

from edgesmith.onnx_graph.edit import drop_unused_initializers, set_input_default

#: the decoder graph output the LM head feeds
LOGITS = "logits"


def lm_head_node(graph):
    """The MatMul whose output is (or alone feeds) the ``logits`` output, or None."""
    producers = {o: n for n in graph.node for o in n.output}
    name = LOGITS
    for _ in range(6):  # logits <- [Cast/Mul/Tanh/Add...] <- MatMul
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node
        name = node.input[0]
    return None


def _is_plain_transpose(node) -> bool:
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return node.op_type == "Transpose" and perm in ([], [[1, 0]])


def materialize_transposed_weights(graph) -> int:
    """``MatMul(x, Transpose(W))`` of a constant W (how a tied LM head can come out of an exporter)
    -> ``MatMul(x, W_t)`` with a transposed copy, so that the quantizer sees a constant weight.
    Returns how many MatMuls were rewritten."""
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
        if len(inits[t.input[0]].dims) != 2 or not _is_plain_transpose(t):
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


def untie_embedding_transpose(graph) -> bool:
    """``Gather(Transpose(W), ids)`` with W the LM head's [hidden, vocab] weight -> ``Gather(E, ids)``
    and ``MatMul(x, Transpose(E))`` with E = W^T stored once. Returns whether it applied."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    head = lm_head_node(graph)
    if head is None or head.input[1] not in inits:
        return False
    weight = inits[head.input[1]]
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in producers:
            continue
        transpose = producers[node.input[0]]
        if not _is_plain_transpose(transpose) or transpose.input[0] != weight.name:
            continue
        table = numpy_helper.to_array(weight).T.copy()
        name = "model.embed_tokens.weight"
        while name in inits:
            name += "_"
        graph.initializer.append(numpy_helper.from_array(table, name))
        node.input[0] = name
        transpose.input[0] = name
        head.input[1] = transpose.output[0]
        drop_unused_initializers(graph)  # W: nothing reads it any more
        return True
    return False


#: what ``logits_to_keep`` is when a consumer does not feed it: Hugging Face's 0, every position
KEEP_ALL_LOGITS = 0


def keep_all_logits_by_default(graph, name: str) -> None:
    """Make the int64 scalar input ``name`` (``logits_to_keep``) optional with the keep-everything
    default, so that a consumer unaware of it (Optimum's ORTModelForCausalLM, ORT GenAI, a plain
    ``session.run``) gets the logits of every position while edgesmith's loop still feeds 1."""
    import numpy as np

    set_input_default(graph, name, np.array(KEEP_ALL_LOGITS, dtype=np.int64))
