"""Graph-generic ONNX edits: unused initializers dropped (subgraphs too), the com.microsoft opset,
an input given a default value, saving.

What every rewrite of a graph's weights needs after it has swapped nodes: the replaced float
weights dropped (:func:`drop_unused_initializers`, which keeps what an If/Loop/Scan body reads
from the outer scope), ONNX Runtime's contrib domain declared when a contrib op was added
(:func:`ensure_ms_opset`), and the graph written as an artifact's ``model.onnx``
(:func:`save_graph`). Used by weight-only quantization, the GGUF repack and the ORT GenAI export.
:func:`set_input_default` makes an input optional: an initializer of the same name is the value a
consumer that does not feed it gets (ONNX IR >= 4; ONNX Runtime then lists the name among the
session's ``get_overridable_initializers()``, no longer among ``get_inputs()``).

Layer L1: imports onnx and edgesmith.artifacts (for the file name) only.
"""

from __future__ import annotations

from pathlib import Path

from edgesmith.artifacts import ONNX_FILE

#: ONNX Runtime's contrib op domain (MatMulNBits, GatherBlockQuantized, GroupQueryAttention...)
MS_DOMAIN = "com.microsoft"
#: graphs larger than this are written with their tensors in model.onnx.data (protobuf's 2 GB limit)
EXTERNAL_DATA_BYTES = 2_000_000_000


def subgraph_inputs(graph) -> set[str]:
    """Names read inside If/Loop/Scan bodies (their outer-scope initializers must stay)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= {i for n in sub.node for i in n.input}
                names |= subgraph_inputs(sub)
    return names


def drop_unused_initializers(graph) -> None:
    """Remove initializers no node (nor subgraph, nor graph output) reads: the replaced float weights."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output} | subgraph_inputs(graph)
    keep = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


def set_input_default(graph, name: str, value) -> None:
    """Give graph input ``name`` the default ``value`` (a numpy array of the input's element type
    and rank): an initializer of the same name, replacing one that was there. A consumer that
    feeds the input overrides it; one that does not runs with ``value``."""
    from onnx import helper, numpy_helper

    declared = next((i for i in graph.input if i.name == name), None)
    if declared is None:
        raise ValueError(f"the graph has no input {name!r} to give a default")
    tensor = numpy_helper.from_array(value, name)
    elem, rank = declared.type.tensor_type.elem_type, len(declared.type.tensor_type.shape.dim)
    if tensor.data_type != elem or len(tensor.dims) != rank:
        raise ValueError(f"default for input {name!r} is a {helper.tensor_dtype_to_np_dtype(tensor.data_type)} "
                         f"of rank {len(tensor.dims)}; the input is a {helper.tensor_dtype_to_np_dtype(elem)} of "
                         f"rank {rank}")
    for index in reversed([k for k, init in enumerate(graph.initializer) if init.name == name]):
        del graph.initializer[index]
    graph.initializer.append(tensor)


def ensure_ms_opset(model) -> None:
    """Declare the com.microsoft opset (version 1) on ``model`` unless it already is."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


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
