"""The quantize pass's options (:class:`QuantizeConfig`) and the constants its modules share."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from edgesmith.compress.quantization.weight_only.methods import METHODS
from edgesmith.compress.quantization.weight_only.sources import SOURCES
from edgesmith.passes import PassConfig

#: op types that carry weights and that ORT's dynamic (IntegerOps) quantizer handles. Gemm is
#: rewritten to MatMul + Add by the dynamic quantizer and quantized as a MatMul; Gather (embedding
#: tables) is chosen with ``quantize_embeddings`` rather than listed here.
DYNAMIC_WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "Attention", "LSTM", "EmbedLayerNormalization")
#: weight op types of static (QDQ) mode
STATIC_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
#: texts embedded by both graphs for the mean-cosine and neighbour-recall part of the report
FIDELITY_TEXTS = 64
#: sentences the probe batches of ``compare_outputs`` are drawn from
PROBE_POOL = 256
#: what every graph change (optimization) must keep, against its input
OPTIMIZE_ATOL = 1e-3
OPTIMIZE_MIN_COSINE = 0.9999

_STATIC_ONLY = ("calibration", "text_field", "calibration_samples", "calibration_batch", "calibration_seq",
                "calibration_chunk", "method", "percentile", "activation_type", "symmetric_activations",
                "ffn_down_float", "activation_matmuls", "extra_op_types")
_FP16_ONLY = ("keep_io_types", "fp16_float_ops")
_INT8_ONLY = ("per_channel", "op_types", "reduce_range", "weight_type", "max_drop", "gate_against", "eval_texts")
#: graph finishing of the INT8/FP16 modes (the weight-only modes write their graph their own way)
_ONNX_PASS_ONLY = ("softmax_floor", "keep_node_metadata")
#: weight-only modes (MatMulNBits; edgesmith.compress.quantization.weight_only) and their own options
WEIGHT_ONLY_MODES = {"int4": 4, "int8-weight": 8}
_WEIGHT_ONLY = ("block", "symmetric", "accuracy_level", "quantize_lm_head", "gguf_file", "pack", "max_kld",
                "fallback")
#: calibration methods of static mode, and the weight-only methods
STATIC_METHODS = ("minmax", "entropy", "percentile")
WEIGHT_METHODS = METHODS


def dynamic_supported_ops() -> list[str]:
    """Op types the installed onnxruntime's dynamic quantizer can quantize (Gather aside)."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    return [op for op in DYNAMIC_WEIGHT_OPS if op in IntegerOpsRegistry or op == "Gemm"]


class QuantizeConfig(PassConfig):
    """How to quantize. ``mode``: ``dynamic`` | ``static`` | ``fp16``.

    INT8 (dynamic and static):

    - ``per_channel``: one scale per output channel of each weight (per-tensor loses noticeably
      more: MiniLM cosine 0.963 per-tensor vs 0.993 per-channel).
    - ``op_types``: weight op types to quantize (dynamic: MatMul, Gemm, Conv, Attention, LSTM,
      EmbedLayerNormalization; static: MatMul, Gemm, Conv).
    - ``reduce_range``: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate.
    - ``weight_type``: ``int8`` (signed, symmetric) or ``uint8``.
    - ``max_drop``: a gate such as ``{cosine: 0.01}`` or ``{accuracy: 0.01}`` (metrics of
      :mod:`edgesmith.quality`); turns on the accuracy-aware search, measured on ``eval_texts``
      texts against ``gate_against`` (the ``parent`` graph, or the run's ``source`` model).

    Dynamic only: ``quantize_embeddings`` (embedding tables as 8-bit).

    Static only: ``calibration`` (a data file streamed lazily, or ``builtin:wordnet``; default the
    run's texts), ``text_field``, ``calibration_samples`` (texts used), ``calibration_batch``,
    ``calibration_seq`` (tokens per row), ``calibration_chunk`` (batches whose activations the
    calibrator holds at once), ``method`` (minmax, entropy, percentile), ``percentile``,
    ``activation_type`` (uint8 or int8), ``symmetric_activations``, ``ffn_down_float``,
    ``activation_matmuls`` (also quantize attention-score MatMuls), ``extra_op_types`` (quantize
    every node of these activation op types too, e.g. Softmax, LayerNormalization, Gelu, Add).

    FP16 only: ``keep_io_types`` (FP32 graph inputs/outputs), ``fp16_float_ops`` (op types kept FP32).

    All modes: ``optimize`` (ORT transformer optimizer first), ``fusions`` (with ``optimize``: only
    these of its fusions, e.g. ``[layer_norm, skip_layer_norm]``; default all), ``min_cosine`` (floor of the pooled
    cosine to the parent), ``softmax_floor`` (e.g. -80: every last-axis Softmax computes
    ``Softmax(max(x - rowmax, floor))``, which keeps padded attention keys out of ONNX Runtime's slow
    exp path with outputs unchanged to float rounding; :mod:`edgesmith.onnx_graph.softmax`; ``auto``:
    -80 only where it times faster on this machine, :mod:`edgesmith.compress.quantization.softmax_choice`), ``keep_node_metadata`` (false: drop the exporter's per-node module paths
    from the output, ~0.3 MB of MiniLM's file; the report is made from the input graph), ``speed_check`` (time parent and result, record ``slower_than_parent``).
    """

    mode: Literal["dynamic", "static", "fp16", "int4", "int8-weight"] = "dynamic"
    per_channel: bool = True
    op_types: list[str] = ["MatMul", "Gemm"]
    quantize_embeddings: bool = False
    reduce_range: bool = False
    weight_type: Literal["int8", "uint8"] = "int8"
    min_cosine: float = 0.95
    # static
    calibration: str | None = None
    text_field: str = "text"
    calibration_samples: int = 256
    calibration_batch: int = 8
    calibration_seq: int = 128
    calibration_chunk: int = 4
    method: Literal[(*STATIC_METHODS, *WEIGHT_METHODS)] = "minmax"  # type: ignore[valid-type]
    percentile: float = 99.999
    activation_type: Literal["uint8", "int8"] = "uint8"
    symmetric_activations: bool = False
    ffn_down_float: bool = True
    activation_matmuls: bool = False
    extra_op_types: list[str] = []
    # fp16
    keep_io_types: bool = True
    fp16_float_ops: list[str] = ["LayerNormalization", "SkipLayerNormalization", "Softmax", "Pow", "ReduceMean", "Exp"]
    # weight-only (int4, int8-weight); method: an algorithm (rtn, the default, hqq, gptq, k-quant) or a source
    # of ready blocks (gguf: the GGUF's own 4-bit blocks repacked exactly: gguf_file, default the GGUF the model
    # was loaded from); weight_only/methods.py and sources.py hold the table
    block: int = 32
    symmetric: bool = False
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    quantize_lm_head: bool = True
    gguf_file: str | None = None
    pack: bool | None = None  # q/k/v and gate/up as one MatMulNBits each (default: on GroupQueryAttention graphs)
    max_kld: float | None = None
    fallback: Literal["int8", "float"] = "int8"
    # all modes
    optimize: bool = False
    fusions: list[str] | None = None
    keep_node_metadata: bool = True
    softmax_floor: float | Literal["auto"] | None = None
    speed_check: bool = False
    # accuracy-aware
    max_drop: dict[str, float] = {}
    gate_against: Literal["parent", "source"] = "parent"
    eval_texts: int = 128

    @field_validator("op_types")
    @classmethod
    def _known_ops(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one op type, e.g. ['MatMul', 'Gemm']")
        supported = dynamic_supported_ops()
        for op in value:
            if op == "Gather":
                raise ValueError("embedding tables (Gather) are chosen with quantize_embeddings: true")
            if op not in supported:
                raise ValueError(f"'{op}' is not an op type ONNX Runtime's dynamic quantizer handles; "
                                 f"use some of: {', '.join(supported)}")
        return list(dict.fromkeys(value))

    @field_validator("fusions")
    @classmethod
    def _known_fusions(cls, value: list[str] | None) -> list[str] | None:
        from edgesmith.onnx_graph.optimize import FUSIONS

        if value is not None:
            unknown = [f for f in value if f not in FUSIONS]
            if unknown:
                raise ValueError(f"unknown fusion(s) {', '.join(unknown)}; choose from {', '.join(FUSIONS)}")
        return None if value is None else list(dict.fromkeys(value))

    @field_validator("softmax_floor")
    @classmethod
    def _softmax_floor(cls, value: float | str | None) -> float | str | None:
        if value is not None and value != "auto" and not -87.0 <= value < 0:
            raise ValueError(f"softmax_floor lies in [-87, 0) so that e^floor is a normal float32, e.g. -80 (got {value})")
        return value

    @field_validator("min_cosine")
    @classmethod
    def _cosine_range(cls, value: float) -> float:
        if not -1.0 <= value <= 1.0:
            raise ValueError("a cosine lies between -1 and 1")
        return value

    @field_validator("percentile")
    @classmethod
    def _percentile_range(cls, value: float) -> float:
        if not 50.0 < value <= 100.0:
            raise ValueError("percentile lies above 50 and at most 100 (e.g. 99.999)")
        return value

    @field_validator("calibration_samples", "calibration_batch", "calibration_seq", "calibration_chunk", "eval_texts")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value

    @field_validator("max_drop")
    @classmethod
    def _gate(cls, value: dict[str, float]) -> dict[str, float]:
        from edgesmith.quality import is_known_metric, known_metrics

        for name, drop in value.items():
            if not is_known_metric(name):
                raise ValueError(f"unknown metric '{name}'; use one of {', '.join(known_metrics())} (recall@10)")
            if not 0 <= drop < 1e9:
                raise ValueError(f"the allowed drop of {name} must be 0 or more (got {drop})")
        return value

    KEY_OMITS_DEFAULT = (*_WEIGHT_ONLY, "fusions", "keep_node_metadata", "softmax_floor")

    def key_dump(self) -> dict:
        """As :meth:`PassConfig.key_dump`; with ``softmax_floor: auto`` the CPU too (model and ISA), since
        the choice is measured on it: a step cached on one CPU is not reused on another."""
        data = super().key_dump()
        if self.softmax_floor == "auto":
            from edgesmith.profiling.agent import cpu_model, isa_flags

            data["softmax_floor_cpu"] = {"cpu_model": cpu_model(), "isa_flags": isa_flags()}
        return data

    @model_validator(mode="after")
    def _options_fit_mode(self) -> QuantizeConfig:
        given = self.model_fields_set
        weight_static = tuple(n for n in _STATIC_ONLY if n != "method")
        foreign = {"dynamic": (*_STATIC_ONLY, *_FP16_ONLY, *_WEIGHT_ONLY),
                   "static": (*_FP16_ONLY, "quantize_embeddings", *_WEIGHT_ONLY),
                   "fp16": (*_STATIC_ONLY, *_INT8_ONLY, "quantize_embeddings", *_WEIGHT_ONLY),
                   "int4": (*weight_static, *_FP16_ONLY, *_INT8_ONLY, *_ONNX_PASS_ONLY),
                   "int8-weight": (*weight_static, *_FP16_ONLY, *_INT8_ONLY, *_ONNX_PASS_ONLY)}[self.mode]
        wrong = [name for name in foreign if name in given]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} do(es) not apply to mode '{self.mode}'")
        if self.mode == "static":
            bad = [op for op in self.op_types if op not in STATIC_WEIGHT_OPS]
            if bad:
                raise ValueError(f"static mode quantizes weight op types {', '.join(STATIC_WEIGHT_OPS)}, not {', '.join(bad)}")
        if self.softmax_floor == "auto" and self.mode == "fp16":
            raise ValueError("softmax_floor: auto times the graph on this machine's CPU, and fp16 graphs are for GPU "
                             "targets; give a floor such as -80, or leave it out")
        if self.fusions is not None and not self.optimize:
            raise ValueError("fusions chooses the optimizer's fusions: set optimize: true too")
        if self.method != "percentile" and "percentile" in given:
            raise ValueError("percentile applies to method: percentile only")
        if self.mode in WEIGHT_ONLY_MODES:
            if "method" not in given:
                self.method = "rtn"
            elif self.method not in WEIGHT_METHODS:
                raise ValueError(f"method '{self.method}' is a static calibration method; mode {self.mode} takes "
                                 f"{', '.join(WEIGHT_METHODS)}")
        elif self.method not in STATIC_METHODS:
            raise ValueError(f"method '{self.method}' is a weight-only method (mode int4 or int8-weight); "
                             f"mode {self.mode} takes {', '.join(STATIC_METHODS)}")
        return self

    @property
    def target_ops(self) -> list[str]:
        return self.op_types + (["Gather"] if self.quantize_embeddings else [])

    @property
    def precision(self) -> str:
        if self.mode in WEIGHT_ONLY_MODES:
            return f"int{WEIGHT_ONLY_MODES[self.mode]}-weight"
        return "fp16" if self.mode == "fp16" else f"{self.weight_type}-{self.mode}"

    def weight_only(self, model) -> dict:
        """The options of :class:`edgesmith.compress.quantization.weight_only.WeightOnlyConfig` this config
        means for ``model`` (the file it was loaded from is the default file of a source of ready blocks:
        the GGUF of method gguf)."""
        options = {"method": self.method, "accuracy_level": self.accuracy_level,
                   "quantize_lm_head": self.quantize_lm_head}
        given = self.model_fields_set
        if self.method in SOURCES:
            source = SOURCES[self.method]
            options[source.file_option] = getattr(self, source.file_option) or source.recorded_file(model.meta)
            if not options[source.file_option]:
                raise ValueError(f"method {source.name} needs {source.file_option}: the {source.label} the model was "
                                 f"dequantized from (recorded automatically when the model was loaded from a "
                                 f"{source.label})")
        else:
            options.update(bits=WEIGHT_ONLY_MODES[self.mode], block=self.block, symmetric=self.symmetric)
            if self.max_kld is not None:
                options.update(max_kld=self.max_kld, fallback=self.fallback)
        if "quantize_embeddings" in given:
            options["quantize_embedding"] = self.quantize_embeddings
        if self.pack is not None:
            options["pack"] = self.pack
        return options
