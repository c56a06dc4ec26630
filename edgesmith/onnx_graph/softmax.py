"""Softmax inputs kept out of ONNX Runtime's slow exp path (padded attention keys).

An encoder's attention adds a large negative mask (``finfo(float32).min`` from transformers) to the
scores of padded keys. ONNX Runtime's CPU Softmax computes ``exp(x - max)``; arguments below about
-88 (where the float32 result would be denormal or zero) are about ten times slower to compute than
ordinary ones on our CPU (a [1, 12, 128, 128] Softmax, 116 of 128 keys masked: 5.5-6 ms against
0.4-0.6 ms unmasked, ORT 1.32; FIELD-NOTES). At batch 1 × 128 tokens of short sentences most keys
are padding, and Softmax became the largest op of the INT8 MiniLM graph.

:func:`floor_softmax_inputs` rewrites every last-axis float Softmax as
``Softmax(Max(x - ReduceMax(x), floor))``: the shift does not change a softmax, and with the default
floor of -80 a masked key keeps a weight of at most e^-80 ≈ 1.8e-35 of the row's largest (zero before;
far below float32's resolution of 1.2e-7 near 1), so the outputs agree with the original graph to
float rounding, while every exp argument stays where the fast path computes it.

Whether that is faster depends on the CPU: measured 1.26x on an Intel Xeon (AVX-512, AMX) but
0.94-0.97x on an AMD EPYC, so the quantize pass's ``softmax_floor: auto`` times the graph both ways
on the machine it runs on (:mod:`edgesmith.compress.quantization.softmax_choice`).
:func:`softmax_floor_of` reads back the floor a graph carries.
"""

from __future__ import annotations

from typing import Any

#: the lowest exp argument the rewritten Softmax sees (e^-80 is a normal float32)
SOFTMAX_FLOOR = -80.0
#: the initializer holding the floor in a rewritten graph
FLOOR_INITIALIZER = "edgesmith_softmax_floor"


def _opset(model, domain: str = "") -> int:
    return next((o.version for o in model.opset_import if o.domain in (domain, "ai.onnx")), 0)


def floor_softmax_inputs(model, floor: float = SOFTMAX_FLOOR) -> dict[str, Any]:
    """Rewrite, in place, every float Softmax over the last axis of ``model`` (a ModelProto) as
    ``Softmax(Max(x - ReduceMax(x, last axis), floor))``. Returns ``{"rewritten": n, "floor": floor}``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    if not -87.0 <= floor < 0:
        raise ValueError(f"the softmax floor must lie in [-87, 0) so that e^floor is a normal float32 (got {floor})")
    graph = model.graph
    opset = _opset(model)
    other = {vi.name for vi in [*graph.value_info, *graph.input, *graph.output]
             if vi.type.tensor_type.elem_type not in (0, TensorProto.FLOAT)}  # typed, and not float32
    nodes = list(graph.node)
    out, rewritten = [], 0
    floor_name = FLOOR_INITIALIZER
    axes_name = "edgesmith_softmax_axes"
    for node in nodes:
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx") or axis != -1 or node.input[0] in other:
            out.append(node)
            continue
        x, base = node.input[0], node.name or f"softmax_{rewritten}"
        peak, shifted, floored = f"{base}_rowmax", f"{base}_shifted", f"{base}_floored"
        if opset >= 18:
            reduce = helper.make_node("ReduceMax", [x, axes_name], [peak], name=f"{base}/ReduceMax", keepdims=1)
        else:
            reduce = helper.make_node("ReduceMax", [x], [peak], name=f"{base}/ReduceMax", axes=[-1], keepdims=1)
        out += [reduce,
                helper.make_node("Sub", [x, peak], [shifted], name=f"{base}/Sub"),
                helper.make_node("Max", [shifted, floor_name], [floored], name=f"{base}/Max")]
        node.input[0] = floored
        out.append(node)
        rewritten += 1
    if rewritten:
        graph.ClearField("node")
        graph.node.extend(out)
        graph.initializer.append(numpy_helper.from_array(np.array(floor, dtype=np.float32), floor_name))
        if opset >= 18:
            graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes_name))
    return {"rewritten": rewritten, "floor": floor}


def softmax_floor_of(model) -> dict[str, Any] | None:
    """``{"floor": value, "floored": n}`` for a graph rewritten by :func:`floor_softmax_inputs` (n:
    the Softmax nodes fed through the floor), None for a graph without it."""
    from onnx import numpy_helper

    init = next((i for i in model.graph.initializer if i.name == FLOOR_INITIALIZER), None)
    if init is None:
        return None
    producers = {o: n for n in model.graph.node for o in n.output}
    floored = sum(1 for n in model.graph.node if n.op_type == "Softmax" and n.input
                  and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Max"
                  and FLOOR_INITIALIZER in producers[n.input[0]].input)
    return {"floor": float(numpy_helper.to_array(init)), "floored": floored}
