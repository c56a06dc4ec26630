"""Typed artifacts: what passes take and return. Each saves to and loads from a folder.

A folder holds the artifact's own files (safetensors weights or ``model.onnx``, the Hugging Face
``config.json`` and tokenizer files) and a small ``edgesmith.json``: kind, task, input/output
names, lineage (every pass applied, its config and the content hash of its output) and, for torch
models whose shapes a stock config cannot describe (head-pruned BERT for example), the structure
that rebuilds them. Nothing is ever unpickled.

One kind per module, each reading its folder back with ``load_folder``: :mod:`.torch`
(:class:`TorchModel`, and Hugging Face folders), :mod:`.onnx`, :mod:`.tensorrt`, :mod:`.early_exit`,
:mod:`.gguf`; the contract is :mod:`.base`, the tokenizer beside a model :mod:`.tokenizer`, model
names and the packaged default :mod:`.paths`, and :func:`load` (any model, any kind) :mod:`.loading`.
"""

from __future__ import annotations

from edgesmith.artifacts.base import (
    META_FILE,
    SCHEMA_VERSION,
    TASKS,
    Artifact,
    FolderArtifact,
    check_task,
    copy_companions,
    output_name,
)
from edgesmith.artifacts.early_exit import EXIT_POLICY_FILE, EXIT_TORCH_DIR, EarlyExitModel
from edgesmith.artifacts.gguf import (
    GGUF_FILE,
    GgufModel,
    check_gguf_file,
    gguf_path,
    load_gguf_dequantized,
    load_gguf_file,
)
from edgesmith.artifacts.loading import ARTIFACT_KINDS, has_tokenizer, load, read_meta
from edgesmith.artifacts.onnx import ONNX_FILE, OnnxModel, check_onnx_file, load_onnx_file
from edgesmith.artifacts.paths import DEFAULT_MODEL, default_model_path, is_default_model, resolve_model_path
from edgesmith.artifacts.tensorrt import ENGINE_FILE, ENGINE_META_KEYS, TensorRTEngine
from edgesmith.artifacts.tokenizer import TOKENIZER_FILES, has_tokenizer_files, load_tokenizer
from edgesmith.artifacts.torch import TorchModel, load_huggingface, task_of_config, weights_file_of

__all__ = ["ARTIFACT_KINDS", "DEFAULT_MODEL", "ENGINE_FILE", "ENGINE_META_KEYS", "EXIT_POLICY_FILE", "EXIT_TORCH_DIR",
           "GGUF_FILE", "META_FILE", "ONNX_FILE", "SCHEMA_VERSION", "TASKS", "TOKENIZER_FILES", "Artifact",
           "EarlyExitModel", "FolderArtifact", "GgufModel", "OnnxModel", "TensorRTEngine", "TorchModel",
           "check_gguf_file", "check_onnx_file", "check_task", "copy_companions", "default_model_path", "has_tokenizer",
           "gguf_path", "has_tokenizer_files", "is_default_model", "load", "load_gguf_dequantized", "load_gguf_file", "load_huggingface",
           "load_onnx_file", "load_tokenizer", "output_name", "read_meta", "resolve_model_path", "task_of_config",
           "weights_file_of"]
