"""TensorRT engines (:class:`TensorRTEngine`), with the record of the GPU and TensorRT they were built for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgesmith.artifacts.base import FolderArtifact, one_file_hash
from edgesmith.errors import BadInput

ENGINE_FILE = "model.engine"
#: what every engine's ``meta["tensorrt"]`` records (see edgesmith.tensorrt.build.EngineMeta)
ENGINE_META_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "profiles", "precision",
                    "source_onnx_hash")


@dataclass
class TensorRTEngine(FolderArtifact):
    """A serialised TensorRT engine (``model.engine``) with the tokenizer files of its ONNX source.

    ``meta["tensorrt"]`` says what it was built for: TensorRT version, GPU name and compute
    capability, optimization profiles, precision and the content hash of the ONNX model. An engine
    only runs on the GPU model and TensorRT version it was built with; the TensorRT runtime checks
    this record before it deserialises anything and refuses a mismatch with a clear message.
    """

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    kind: ClassVar[str] = "tensorrt"

    @property
    def path(self) -> Path:
        assert self.folder is not None
        return self.folder / ENGINE_FILE

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)

    @property
    def engine_meta(self) -> dict[str, Any]:
        return dict(self.meta.get("tensorrt") or {})

    def content_hash(self) -> str:
        return one_file_hash(self.path, self.task)

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    @classmethod
    def load_folder(cls, path: Path, meta: dict) -> TensorRTEngine:
        if not (path / ENGINE_FILE).exists():
            raise BadInput(f"{path}: edgesmith.json says kind 'tensorrt' but {ENGINE_FILE} is missing; rebuild it "
                           "with `edgesmith export MODEL.onnx --to tensorrt`")
        record = (meta.get("meta") or {}).get("tensorrt")
        missing = [k for k in ENGINE_META_KEYS if not isinstance(record, dict) or k not in record]
        if missing:
            raise BadInput(f"{path}: the engine's metadata lacks {', '.join(missing)}; it cannot be checked against "
                           "this GPU, rebuild it with `edgesmith export MODEL.onnx --to tensorrt`")
        return cls(task=meta.get("task", "feature-extraction"), name=meta.get("name", path.name),
                   lineage=meta.get("lineage", []), meta=meta.get("meta", {}), folder=path,
                   inputs=list(meta.get("inputs") or []), outputs=list(meta.get("outputs") or []))
