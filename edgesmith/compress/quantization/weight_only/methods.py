"""The weight-only methods, one table: each qparams algorithm (rtn, hqq, gptq, k-quant) with its bits,
whether it calibrates, its own options and how it quantizes.

A method is how each block's scale (and zero point) is chosen from float weights; all of them
write ``MatMulNBits`` through ONNX Runtime's quantizer (:func:`.ort.run_quantizer`). The config's
``method`` values, the CLI help and the config's validators are read from :data:`ALGORITHMS`
(and :data:`~.sources.SOURCES`, where ready blocks come from a file instead). Adding a method is
one :class:`Algorithm` entry and the function that builds its ORT config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgesmith.compress.quantization.weight_only.ort import CalibrationReader, ort_quantizer_module, run_quantizer
from edgesmith.compress.quantization.weight_only.sources import SOURCES
from edgesmith.errors import BadInput

MATMUL = ("MatMul",)


@dataclass(frozen=True)
class Request:
    """What one quantization asks of a method (a WeightOnlyConfig's fields, or ort_quantize's arguments)."""

    bits: int
    block: int
    symmetric: bool
    accuracy_level: int
    calibration: list[dict[str, Any]] | None = None
    gptq_damp: float = 0.01
    gptq_actorder: bool = False


@dataclass(frozen=True)
class Algorithm:
    """A qparams algorithm of ORT's MatMulNBitsQuantizer.

    ``bits``: the widths it writes; ``needs_calibration``: it runs the float graph on corpus
    passages in the decoder layout (decoders only); ``float_zero_points``: it always writes float
    zero points (so no ``symmetric``; MatMulNBits' slow CPU kernel); ``options``: the config
    fields that belong to it alone; ``ort_config(mnq, model, request)``: ORT's algorithm config;
    ``available()``: whether the installed onnxruntime has it, else ``unavailable`` says why."""

    name: str
    bits: tuple[int, ...]
    needs_calibration: bool
    help: str
    ort_config: Callable[[Any, Any, Request], Any]
    float_zero_points: bool = False
    options: tuple[str, ...] = ()
    origin: str = "ONNX Runtime"
    available: Callable[[], bool] = lambda: True
    unavailable: str = ""
    warning: str | None = None

    def quantize(self, model, request: Request, *, exclude: list[str]):
        """A quantized copy of ``model`` (a ModelProto): every MatMul with a constant 2-D weight but
        ``exclude`` (ORT's GPTQ ignores exclusions; the caller composes per node anyway)."""
        algo = self.ort_config(ort_quantizer_module(), model, request)
        return run_quantizer(model, algo, label=f"{self.name}, {request.bits} bits", block=request.block,
                             symmetric=request.symmetric, accuracy_level=request.accuracy_level, exclude=exclude)


def _rtn(mnq, model, r: Request):
    return mnq.DefaultWeightOnlyQuantConfig(block_size=r.block, is_symmetric=r.symmetric,
                                            accuracy_level=r.accuracy_level or None, bits=r.bits,
                                            op_types_to_quantize=MATMUL)


def _hqq(mnq, model, r: Request):
    return mnq.HQQWeightOnlyQuantConfig(block_size=r.block, bits=r.bits, op_types_to_quantize=MATMUL)


def _gptq(mnq, model, r: Request):
    return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=CalibrationReader(r.calibration or []),
                                         percdamp=r.gptq_damp, actorder=r.gptq_actorder, op_types_to_quantize=MATMUL)


def _kquant(mnq, model, r: Request):
    custom = None
    if r.bits != 4:
        custom = {n.name: {"bits": r.bits} for n in model.graph.node if n.op_type == "MatMul"}
    return mnq.KQuantWeightOnlyQuantConfig(op_types_to_quantize=MATMUL, customized_weight_config=custom)


def kquant_available() -> bool:
    return hasattr(ort_quantizer_module(), "KQuantWeightOnlyQuantConfig")


#: the qparams algorithms, by the name ``method`` takes
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("rtn", (4, 8), False, "round to nearest", _rtn),
    Algorithm("hqq", (4, 8), False, "half-quadratic, no data", _hqq, float_zero_points=True,
              warning="hqq writes float zero points, which take ONNX Runtime's slow MatMulNBits kernel on the "
                      "CPU (SmolLM2 one-token forward 1.2 s vs 0.04 s for rtn); prefer rtn, k-quant or gptq"),
    Algorithm("gptq", (4,), True, "second-order, calibrated", _gptq, origin="ONNX Runtime's GPTQ",
              options=("calibration_passages", "gptq_damp", "gptq_actorder")),
    Algorithm("k-quant", (4, 8), False, "llama.cpp-style scale search", _kquant, available=kquant_available,
              unavailable="this onnxruntime has no k-quant (KQuantWeightOnlyQuantConfig); upgrade it or use rtn"),
)}
#: every value ``method`` takes: the algorithms, then the sources of ready blocks
METHODS: tuple[str, ...] = (*ALGORITHMS, *SOURCES)


def methods_help() -> str:
    """``rtn | hqq | gptq | k-quant | gguf (...)``: the methods for a CLI help line."""
    return " | ".join([*ALGORITHMS, *(f"{s.name} ({s.help})" for s in SOURCES.values())])


def ort_quantize(model, *, bits: int, block: int, method: str, symmetric: bool, accuracy_level: int,
                 exclude: list[str], calibration: list[dict[str, Any]] | None = None,
                 gptq_damp: float = 0.01, gptq_actorder: bool = False):
    """Run ONNX Runtime's MatMulNBitsQuantizer with ``method`` on a copy of ``model`` (a
    ModelProto); return the quantized ModelProto. Every MatMul with a constant 2-D weight is
    quantized but ``exclude`` (ORT's GPTQ ignores exclusions; the caller composes per node anyway)."""
    if method not in ALGORITHMS:
        raise BadInput(f"unknown weight-only method {method!r}; use one of {', '.join(ALGORITHMS)}")
    request = Request(bits=bits, block=block, symmetric=symmetric, accuracy_level=accuracy_level,
                      calibration=calibration, gptq_damp=gptq_damp, gptq_actorder=gptq_actorder)
    return ALGORITHMS[method].quantize(model, request, exclude=exclude)
