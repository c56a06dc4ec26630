"""Loading any artifact: a model name or path resolved, its record read and checked, the kind's
``load_folder`` called; bare ``.onnx``, ``.gguf`` and Hugging Face folders too."""

from __future__ import annotations

from pathlib import Path

from edgesmith.artifacts.base import META_FILE, Artifact, read_record
from edgesmith.artifacts.early_exit import EarlyExitModel
from edgesmith.artifacts.gguf import GgufModel, load_gguf_dequantized
from edgesmith.artifacts.onnx import ONNX_FILE, OnnxModel, load_onnx_file
from edgesmith.artifacts.paths import resolve_model_path
from edgesmith.artifacts.tensorrt import TensorRTEngine
from edgesmith.artifacts.tokenizer import has_tokenizer_files
from edgesmith.artifacts.torch import TorchModel, load_huggingface
from edgesmith.errors import BadInput, dangling_link

ARTIFACT_KINDS: dict[str, type[Artifact]] = {"torch": TorchModel, "onnx": OnnxModel, "tensorrt": TensorRTEngine,
                                             "early-exit": EarlyExitModel, "gguf": GgufModel}


def load(model: str | Path | None = None, *, task: str | None = None, trust_remote_code: bool = False) -> Artifact:
    """Load an artifact: ``"minilm"`` (the default model), ``"smollm2"`` (the packaged decoder LLM),
    a Hugging Face folder, an edgesmith artifact folder, an ``.onnx`` file or a ``.gguf`` file."""
    path = resolve_model_path(model)
    if path.is_dir() and path.suffix in (".onnx", ".gguf"):
        raise BadInput(f"{path}: is a folder, not a{'n' if path.suffix == '.onnx' else ''} {path.suffix} file")
    if path.is_file():
        if path.suffix in (".engine", ".plan", ".trt") and (path.parent / META_FILE).exists():
            return load(path.parent, task=task, trust_remote_code=trust_remote_code)
        if path.suffix in (".engine", ".plan", ".trt"):
            raise BadInput(f"{path}: a bare TensorRT engine has no record of the GPU and TensorRT version it was built "
                           "for; build one with `edgesmith export MODEL.onnx --to tensorrt` and give its folder")
        if path.suffix == ".gguf":
            return load_gguf_dequantized(path, task)
        if path.suffix != ".onnx":
            raise BadInput(f"{path}: not a model folder, an .onnx or a .gguf file")
        return load_onnx_file(path, task)
    for entry in sorted(path.iterdir()):  # a model file that is a link to nowhere would read as absent
        if dangling_link(entry):
            raise dangling_link(entry)
    meta_path = path / META_FILE
    if meta_path.exists():
        meta = read_meta(meta_path)
        kind = meta.get("kind")
        if kind == "torch":
            return TorchModel.load_folder(path, meta, trust_remote_code=trust_remote_code)
        if kind in ARTIFACT_KINDS:
            return ARTIFACT_KINDS[kind].load_folder(path, meta)
        raise BadInput(f"{meta_path}: unknown artifact kind {kind!r} (known: {', '.join(ARTIFACT_KINDS)})")
    if (path / ONNX_FILE).exists():
        return load_onnx_file(path / ONNX_FILE, task)
    if (path / "config.json").exists():
        return load_huggingface(path, task=task, trust_remote_code=trust_remote_code)
    raise BadInput(f"{path}: no config.json, model.onnx or edgesmith.json in this folder; give a Hugging Face model folder or an edgesmith artifact")


def read_meta(meta_path: Path) -> dict:
    """An artifact folder's ``edgesmith.json``, checked: BadInput naming the file when it is damaged."""
    return read_record(meta_path, ARTIFACT_KINDS)


def has_tokenizer(model: str | Path | None) -> bool:
    """Whether a model (as :func:`load` takes it) comes with a tokenizer, read from its files only."""
    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        return True  # the GGUF carries its vocabulary
    folder = path.parent if path.is_file() else path
    return has_tokenizer_files(folder)
