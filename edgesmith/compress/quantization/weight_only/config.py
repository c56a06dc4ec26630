"""The weight-only pass's options (:class:`WeightOnlyConfig`), checked against the method table."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from edgesmith.compress.quantization.weight_only.methods import ALGORITHMS, METHODS
from edgesmith.compress.quantization.weight_only.sources import FIXED_BY_SOURCE, SOURCES
from edgesmith.passes import PassConfig

#: options that belong to one algorithm alone (name -> the algorithm)
OWN_OPTIONS = {option: a.name for a in ALGORITHMS.values() for option in a.options}


class WeightOnlyConfig(PassConfig):
    """How to quantize weights only.

    - ``bits``: 4 or 8; ``block``: weights per scale along K (a power of two, at least 16);
      ``symmetric``: no zero points (rtn, gptq, k-quant; hqq always has float zero points).
    - ``method``: ``rtn`` | ``hqq`` | ``gptq`` (4 bits; ``calibration_passages`` corpus passages of
      ``calibration_tokens`` tokens) | ``k-quant`` (:data:`~.methods.ALGORITHMS`).
    - ``accuracy_level``: MatMulNBits' compute precision for the activations (4 = int8, fastest on CPU).
    - ``quantize_lm_head``: the output projection too (else float); ``quantize_embedding``: the
      embedding table as 4-bit GatherBlockQuantized (bits 4 only; default off, lossy).
    - ``method: gguf`` with ``gguf_file``: no re-quantization: the GGUF's own Q4_0/Q4_1/Q8_0 blocks
      repacked exactly (:data:`~.sources.SOURCES`, :mod:`edgesmith.gguf.repack`); the model must be
      the FP32 one transformers dequantized from that file. The GGUF decides bits and blocks; the
      embedding table is repacked too (exact) unless ``quantize_embedding: false``.
    - ``max_kld``: KL budget (nats/token, against the parent graph on held-out text); turns on the
      search that returns the most sensitive layer groups to ``fallback`` (``int8`` or ``float``).
    """

    bits: Literal[4, 8] = 4
    block: int = 32
    method: Literal[METHODS] = "rtn"  # type: ignore[valid-type]
    symmetric: bool = False
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    quantize_lm_head: bool = True
    quantize_embedding: bool | None = None
    gguf_file: str | None = None
    #: one MatMulNBits for the projections that read one input (q/k/v, gate/up), exact
    #: (:mod:`edgesmith.onnx_graph.pack`); None: on GroupQueryAttention graphs (ORT GenAI folders)
    pack: bool | None = None
    max_kld: float | None = None
    fallback: Literal["int8", "float"] = "int8"
    calibration_passages: int = 8
    calibration_tokens: int = 128
    probe_passages: int = 2
    gptq_damp: float = 0.01
    gptq_actorder: bool = False

    @field_validator("block")
    @classmethod
    def _block(cls, value: int) -> int:
        if value < 16 or value & (value - 1):
            raise ValueError(f"block must be a power of two and at least 16 (e.g. 32, 64, 128), not {value}")
        return value

    @field_validator("max_kld")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value < float("inf"):
            raise ValueError(f"max_kld is a KL divergence in nats per token, 0 or more (e.g. 0.05), not {value}")
        return value

    @field_validator("calibration_passages", "calibration_tokens", "probe_passages")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WeightOnlyConfig:
        given = self.model_fields_set
        if self.method in SOURCES:
            self._check_source(given)
        else:
            self._check_algorithm(given)
        if "fallback" in given and self.max_kld is None:
            raise ValueError("fallback applies to the accuracy-aware search only; set max_kld")
        foreign = [n for n, owner in OWN_OPTIONS.items() if n in given and owner != self.method]
        if foreign:
            owners = sorted({OWN_OPTIONS[n] for n in foreign})
            raise ValueError(f"{', '.join(foreign)} apply to method {'/'.join(owners)} only")
        return self

    def _check_source(self, given: set[str]) -> None:
        source = SOURCES[self.method]
        fixed = [n for n in FIXED_BY_SOURCE if n in given]
        if fixed:
            raise ValueError(f"{', '.join(fixed)} do(es) not apply to method {source.name}: the {source.label}'s own "
                             "blocks are repacked exactly")
        if not getattr(self, source.file_option):
            raise ValueError(f"method {source.name} needs {source.file_option}: the {source.label} the model was "
                             "dequantized from")

    def _check_algorithm(self, given: set[str]) -> None:
        algorithm = ALGORITHMS[self.method]
        if self.bits not in algorithm.bits:
            others = "/".join(a.name for a in ALGORITHMS.values() if self.bits in a.bits)
            widths = " or ".join(str(b) for b in algorithm.bits)
            raise ValueError(f"method {algorithm.name} writes {widths}-bit weights only ({algorithm.origin}); "
                             f"use bits: {algorithm.bits[0]} or method {others}")
        if algorithm.float_zero_points and "symmetric" in given and self.symmetric:
            raise ValueError(f"method {algorithm.name} always uses (float) zero points; drop symmetric or use "
                             "method rtn")
        if not algorithm.available():
            raise ValueError(algorithm.unavailable)
        given_files = [s.file_option for s in SOURCES.values() if s.file_option in given]
        if given_files:
            raise ValueError(f"{given_files[0]} applies to method "
                             f"{next(s.name for s in SOURCES.values() if s.file_option == given_files[0])} only")
        if self.quantize_embedding and self.bits != 4:
            raise ValueError("quantize_embedding writes a 4-bit GatherBlockQuantized; use bits: 4")

    @property
    def precision(self) -> str:
        return f"int{self.bits}"

    @property
    def algorithm(self):
        """The method's :class:`~.methods.Algorithm`, or None for a source of ready blocks."""
        return ALGORITHMS.get(self.method)

    @property
    def source(self):
        """The method's :class:`~.sources.BlockSource`, or None for an algorithm."""
        return SOURCES.get(self.method)

    @property
    def embedding(self) -> bool:
        """Whether the embedding table is quantized: by default only when that is exact (a source)."""
        return self.method in SOURCES if self.quantize_embedding is None else self.quantize_embedding

    @property
    def source_file(self) -> str | None:
        """The file a source of ready blocks reads (None for an algorithm)."""
        return getattr(self, self.source.file_option) if self.source else None
