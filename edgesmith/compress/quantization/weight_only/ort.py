"""ONNX Runtime's weight-only quantizer, driven quietly: the runner every method shares, GPTQ's data reader
and the embedding Gather.

Nothing here knows the method names: each method (:mod:`.methods`) builds its own ORT algorithm
config, and :func:`run_quantizer` runs ``MatMulNBitsQuantizer`` with it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgesmith.errors import BadInput, first_line
from edgesmith.onnx_graph.edit import drop_unused_initializers, ensure_ms_opset

#: the loggers ORT's weight-only quantizers talk on (INFO per node; the import even sets the root
#: logger to INFO when it has no handler)
ORT_LOGGERS = ("onnxruntime.quantization.matmul_nbits_quantizer", "neural_compressor")


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


class CalibrationReader:
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


def run_quantizer(model, algo: Any, *, label: str, block: int, symmetric: bool, accuracy_level: int,
                  exclude: list[str]):
    """ORT's ``MatMulNBitsQuantizer`` with the algorithm config ``algo`` on a copy of ``model`` (a
    ModelProto); the quantized ModelProto, every MatNBits node with ``accuracy_level``. ``label``
    (method and bits) names the method in the one line a failure becomes."""
    mnq = ort_quantizer_module()
    try:
        with quiet_ort():
            quantizer = mnq.MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=algo, block_size=block,
                                                 is_symmetric=symmetric, accuracy_level=accuracy_level or None,
                                                 nodes_to_exclude=list(exclude))
            quantizer.process()
    except BadInput:
        raise
    except Exception as exc:  # ORT's quantizers raise assertion, value and runtime errors alike
        raise BadInput(f"ONNX Runtime's weight-only quantizer ({label}) failed on this graph "
                       f"({first_line(exc, 300)}); try method rtn or another block size") from exc
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
    ensure_ms_opset(model)
