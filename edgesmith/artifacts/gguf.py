"""GGUF files (:class:`GgufModel`, run as they are in llama.cpp), and a GGUF read as a dequantized TorchModel.

Two ways to take a ``.gguf``: :func:`load_gguf_file` keeps the file as it is (a :class:`GgufModel`,
what llama.cpp runs); ``edgesmith.load`` of a ``.gguf`` (:func:`load_gguf_dequantized`) gives a
:class:`~edgesmith.artifacts.torch.TorchModel` with the weights dequantized to FP32, which records
its source file. :func:`gguf_path` finds the file either one runs from.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgesmith.artifacts.base import META_FILE, Artifact, FolderArtifact, one_file_hash, read_record
from edgesmith.artifacts.paths import resolve_model_path
from edgesmith.artifacts.tokenizer import has_tokenizer_files
from edgesmith.artifacts.torch import TorchModel, load_huggingface
from edgesmith.errors import BadInput
from edgesmith.gguf.file import check_gguf_header

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
        return one_file_hash(self.path, self.task)

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


def check_gguf_file(path: Path) -> Path:
    """``path`` if it is a readable GGUF file (its header checked); else one line naming what it is."""
    check_gguf_header(path)
    return path


def load_gguf_file(model: str | Path, *, needed_by: str = "this",
                   own_tokenizer: Callable[[Path], Any] | None = None) -> GgufModel:
    """A :class:`GgufModel` run as it is from ``"smollm2"``, a ``.gguf`` path, a folder holding one
    ``.gguf``, or a folder written by ``edgesmith export --to gguf``. Its tokenizer is the folder's
    Hugging Face tokenizer when it has one, else ``own_tokenizer(path)`` (the runtime's reading of the
    file's vocabulary) when given. ``needed_by`` names who asks, in the one line a wrong input gets."""
    path = resolve_model_path(model)
    if path.is_dir() and (path / META_FILE).exists():
        meta = read_record(path / META_FILE)
        if meta["kind"] != GgufModel.kind:
            raise BadInput(f"{path}: {needed_by} runs GGUF files; this folder holds a {meta['kind']} model "
                           "(edgesmith export MODEL --to gguf writes one)")
        return GgufModel.load_folder(path, meta)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise BadInput(f"{path}: {needed_by} runs a GGUF file, and this folder holds "
                           f"{len(found) or 'no'} .gguf file{'s' if len(found) != 1 else ''}; give the .gguf file")
        path = found[0]
    check_gguf_file(path)
    from edgesmith.gguf.source import SMOLLM2_NAME, is_smollm2

    name = SMOLLM2_NAME if is_smollm2(path) else path.stem
    artifact = GgufModel(task="text-generation", name=name, folder=path.parent, file=path.name,
                         meta={"source": str(path)})
    if own_tokenizer is not None and not has_tokenizer_files(path.parent):
        artifact.use_tokenizer(own_tokenizer(path))
    return artifact


def gguf_path(artifact: Artifact, *, needed_by: str = "this") -> Path:
    """The GGUF file an artifact runs from: a :class:`GgufModel`'s, or the source file of a model
    loaded from a GGUF; anything else is one line naming the fix (``needed_by``: who asks)."""
    if isinstance(artifact, GgufModel):
        return artifact.path
    source = ((artifact.meta or {}).get("gguf") or {}).get("path")
    if source:
        return Path(source)
    hint = ("export it to GGUF first (edgesmith export MODEL --to gguf)" if isinstance(artifact, TorchModel)
            else "give a .gguf file")
    raise BadInput(f"{needed_by} runs GGUF files; {artifact.name} is a {artifact.kind} model: {hint}")
