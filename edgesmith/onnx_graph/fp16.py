"""FP16 conversion of ONNX graphs for GPU targets (ONNX Runtime's own float16 converter).

``onnxruntime.transformers.float16`` ships with onnxruntime (onnxconverter-common is not needed).
Graph inputs and outputs stay FP32 (``keep_io_types``) so callers feed and read the same arrays
as before, and numerically sensitive op types stay FP32 behind Cast pairs: by default those whose
FP16 result can overflow or lose the small differences that matter (LayerNormalization's variance,
Softmax's exponentials, Pow and ReduceMean of decomposed norms, Exp), on top of the converter's
own block list (ops without FP16 kernels).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from edgesmith.errors import BadInput

log = logging.getLogger(__name__)

#: op types kept in FP32 by default
SENSITIVE_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax", "Pow", "ReduceMean", "Exp")


def convert_fp16(model, *, keep_io_types: bool = True, float_ops: list[str] | tuple[str, ...] = SENSITIVE_OPS,
                 float_nodes: list[str] | None = None):
    """An FP16 copy of the ``onnx.ModelProto`` ``model`` (the input is not modified)."""
    import copy

    from onnxruntime.transformers import float16

    block = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *float_ops]))
    try:
        return float16.convert_float_to_float16(copy.deepcopy(model), keep_io_types=keep_io_types,
                                                op_block_list=block, node_block_list=list(float_nodes or []),
                                                disable_shape_infer=False)
    except Exception as exc:  # the converter raises bare exceptions on graphs it cannot type
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BadInput(f"FP16 conversion failed ({reason}); try keep_io_types: true or more fp16_float_ops") from exc


def fp16_split(graph) -> dict[str, Any]:
    """Which nodes compute in FP16 and which in FP32, by op type (Casts not counted)."""
    import onnx

    types: dict[str, int] = {}
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    half, full = Counter(), Counter()
    for node in graph.node:
        if node.op_type == "Cast":
            continue
        kinds = {types.get(t) for t in [*node.input, *node.output] if t}
        if onnx.TensorProto.FLOAT16 in kinds:
            half[node.op_type] += 1
        elif onnx.TensorProto.FLOAT in kinds:
            full[node.op_type] += 1
    return {"fp16": dict(half), "fp32": dict(full)}


def fp16_model(model, folder=None, *, keep_io_types: bool = True, float_ops=SENSITIVE_OPS):
    """An FP16 copy of the OnnxModel ``model`` in ``folder`` (a new temporary folder by default),
    with its companion files, ``meta["precision"] = "fp16"`` and the same lineage."""
    import copy
    import tempfile
    from pathlib import Path

    import onnx

    from edgesmith.artifacts import ONNX_FILE, OnnxModel, copy_companions

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="edgesmith-fp16-"))
    folder.mkdir(parents=True, exist_ok=True)
    converted = convert_fp16(onnx.load(str(model.path)), keep_io_types=keep_io_types, float_ops=float_ops)
    onnx.save(converted, str(folder / ONNX_FILE))
    copy_companions(model.folder, folder)
    meta = {**copy.deepcopy(model.meta), "precision": "fp16"}
    return OnnxModel(task=model.task, name=model.name, lineage=copy.deepcopy(model.lineage), meta=meta, folder=folder)
