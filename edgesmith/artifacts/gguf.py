"""GGUF files (:class:`GgufModel`, run as they are in llama.cpp), and a GGUF read as a dequantized TorchModel."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgesmith.artifacts.base import FolderArtifact
from edgesmith.artifacts.torch import TorchModel, load_huggingface
from edgesmith.errors import BadInput
from edgesmith.storage import sha256_file

GGUF_FILE = "model.gguf"


@dataclass
class GgufModel(FolderArtifact):
    """A GGUF file for llama.cpp: ``model.gguf`` with the tokenizer and config files of its source
    (written by :mod:`edgesmith.export.gguf`, whose ``meta["gguf_export"]`` records the quant type,
    every tensor's type and the verdict against the source), or any ``.gguf`` file run as it is
    (``file`` names it inside ``folder``; never dequantized)."""

    file: str = GGUF_FILE

    kind: ClassVar[str] = "gguf"

    @property
    def path(self) -> Path:
        assert self.folder is not None
        return self.folder / self.file

    @property
    def input_names(self) -> list[str]:
        return ["input_ids"]

    @property
    def output_names(self) -> list[str]:
        return ["logits"]

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        digest.update(sha256_file(self.path).encode())
        digest.update(self.task.encode())
        return digest.hexdigest()

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def _write(self, folder: Path) -> None:
        if self.file == GGUF_FILE:
            super()._write(folder)
        else:  # a file run as it is: only the file travels, under the artifact's name for it
            shutil.copy2(self.path, folder / GGUF_FILE)

    def save(self, folder: str | Path) -> Path:
        moved = self.folder is None or Path(folder).resolve() != self.folder.resolve()
        if not moved and self.file != GGUF_FILE:
            raise BadInput(f"{self.path}: save a GGUF run as it is into a new folder (it becomes {GGUF_FILE} there)")
        out = super().save(folder)
        self.file = GGUF_FILE
        return out

    @classmethod
    def load_folder(cls, path: Path, meta: dict) -> GgufModel:
        if not (path / GGUF_FILE).exists():
            raise BadInput(f"{path}: edgesmith.json says kind 'gguf' but {GGUF_FILE} is missing; write it again with "
                           "`edgesmith export MODEL --to gguf`")
        return cls(task=meta.get("task", "text-generation"), name=meta.get("name", path.name),
                   lineage=meta.get("lineage", []), meta=meta.get("meta", {}), folder=path)


def load_gguf_dequantized(path: Path, task: str | None) -> TorchModel:
    """A GGUF as a TorchModel: its weights dequantized to FP32 (cached folder, see edgesmith.gguf.source)."""
    from edgesmith.gguf.source import SMOLLM2_NAME, gguf_to_folder, is_smollm2, read_source_record

    if task not in (None, "text-generation"):
        raise BadInput(f"{path}: a GGUF model is a causal LM; its task is 'text-generation', not {task!r}")
    folder = gguf_to_folder(path)
    model = load_huggingface(folder, task="text-generation")
    record = read_source_record(folder)
    model.name = SMOLLM2_NAME if is_smollm2(path) else path.stem
    model.meta = {"source": str(path), "gguf": {
        "path": str(path.resolve()), "sha256": record["sha256"], "architecture": record["architecture"],
        "quant_summary": record["quant_summary"], "quant_types": record["quant_types"], "folder": str(folder)},
        "origin": {"gguf": str(path.resolve())}}
    return model
