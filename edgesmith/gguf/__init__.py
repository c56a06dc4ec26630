"""GGUF files (llama.cpp's format) as edgesmith sources.

:mod:`edgesmith.gguf.source` reads a GGUF's header, checks that transformers can read its
architecture, and dequantizes it once into a plain FP32 Hugging Face folder kept in the edgesmith
cache; that FP32 model is what every fidelity number of a GGUF-born artifact is measured against.
"""

from __future__ import annotations

from edgesmith.gguf.source import (
    SMOLLM2_NAME,
    gguf_to_folder,
    inspect_gguf,
    is_smollm2,
    read_source_record,
    smollm2_gguf_path,
    supported_architectures,
)

__all__ = ["SMOLLM2_NAME", "gguf_to_folder", "inspect_gguf", "is_smollm2", "read_source_record",
           "smollm2_gguf_path", "supported_architectures"]
