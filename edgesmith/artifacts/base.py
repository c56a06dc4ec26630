"""The artifact contract: :class:`Artifact` (identity, lineage, atomic save), :class:`FolderArtifact`
(an artifact whose content is the files of a folder), the record file and the tasks.

Each kind lives in its own module and reads its folder back with ``load_folder``
(:func:`edgesmith.artifacts.loading.load` dispatches on the record's ``kind``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgesmith.artifacts.tokenizer import load_tokenizer
from edgesmith.errors import BadInput, first_line
from edgesmith.storage import atomic_dir, sha256_file, write_json_atomic

SCHEMA_VERSION = 1
META_FILE = "edgesmith.json"

TASKS = ("feature-extraction", "sequence-classification", "text-generation")


@dataclass
class Artifact:
    """Base of every artifact. ``lineage`` lists the passes that made it, oldest first."""

    task: str = "feature-extraction"
    name: str = "model"
    lineage: list[dict] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "artifact"

    # -- identity -------------------------------------------------------------------------
    def content_hash(self) -> str:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__} does not define content_hash")

    @property
    def input_names(self) -> list[str]:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__} does not define input_names")

    @property
    def output_names(self) -> list[str]:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} does not define output_names")

    def _meta_json(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "kind": self.kind,
            "task": self.task,
            "name": self.name,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "content_hash": self.content_hash(),
            "lineage": self.lineage,
            "meta": self.meta,
        }

    def derive(self, **changes: Any) -> Artifact:
        """A shallow copy with some fields replaced; lineage and meta are copied, not shared."""
        new = copy.copy(self)
        new.lineage = copy.deepcopy(self.lineage)
        new.meta = copy.deepcopy(self.meta)
        for key, value in changes.items():
            setattr(new, key, value)
        return new

    def save(self, folder: str | Path) -> Path:
        """Write the artifact to ``folder`` atomically (a temp sibling renamed into place)."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            self._write(tmp)
            write_json_atomic(tmp / META_FILE, self._meta_json())
        return folder

    def _write(self, folder: Path) -> None:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} does not define _write")

    @classmethod
    def load_folder(cls, path: Path, meta: dict) -> Artifact:  # pragma: no cover - every kind defines it
        raise TypeError(f"{cls.__name__} does not define load_folder")


def output_name(task: str) -> str:
    return {"feature-extraction": "last_hidden_state", "sequence-classification": "logits",
            "text-generation": "logits"}[task]


def one_file_hash(path: Path, task: str) -> str:
    """The content hash of an artifact whose content is one file (an engine, a GGUF): the file's
    SHA-256 and the task."""
    digest = hashlib.sha256()
    digest.update(sha256_file(path).encode())
    digest.update(task.encode())
    return digest.hexdigest()


def check_task(task: str) -> None:
    if task not in TASKS:
        raise BadInput(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")


def read_record(meta_path: Path, kinds: Collection[str] | None = None) -> dict:
    """An artifact folder's ``edgesmith.json``, checked: BadInput naming the file when it is damaged
    (``kinds``: the known kinds, when the caller knows them all)."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSON and UTF-8 errors are ValueErrors; a folder is an OSError
        raise BadInput(f"{meta_path}: not valid JSON ({first_line(exc, 160)}); the artifact folder is damaged, "
                       "re-create it") from exc
    if not isinstance(meta, dict) or "kind" not in meta:
        raise BadInput(f"{meta_path}: missing 'kind'; the artifact folder is damaged, re-create it")
    schema = meta.get("schema", 0)
    if not isinstance(schema, int) or isinstance(schema, bool) or not isinstance(meta["kind"], str):
        raise BadInput(f"{meta_path}: 'schema' must be a number and 'kind' a name (got {schema!r}, "
                       f"{meta['kind']!r}); the artifact folder is damaged, re-create it")
    if schema > SCHEMA_VERSION:
        raise BadInput(f"{meta_path}: written by a newer edgesmith (schema {meta['schema']}); upgrade edgesmith")
    if kinds is not None and meta["kind"] not in kinds:
        raise BadInput(f"{meta_path}: unknown artifact kind {meta['kind']!r} (known: {', '.join(kinds)})")
    for key, kind in (("lineage", list), ("meta", dict), ("structure", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise BadInput(f"{meta_path}: '{key}' must be a {'list' if kind is list else 'mapping'}; the artifact "
                           "folder is damaged, re-create it")
    return meta


@dataclass
class FolderArtifact(Artifact):
    """An artifact whose content is the files of ``folder`` (never modified once made)."""

    folder: Path | None = None

    def _files(self) -> list[Path]:
        assert self.folder is not None
        own_meta = self.folder / META_FILE  # written by save(); nested records (a backbone's) are content
        return sorted(f for f in self.folder.rglob("*") if f.is_file() and f != own_meta)

    @property
    def tokenizer(self):
        """The tokenizer saved beside the model (loaded once), or None; an attribute, as on a TorchModel."""
        if "_tokenizer" not in self.__dict__:
            self.__dict__["_tokenizer"] = None if self.folder is None else load_tokenizer(self.folder)
        return self.__dict__["_tokenizer"]

    def use_tokenizer(self, tokenizer) -> None:
        """Use ``tokenizer`` instead of the folder's tokenizer files (a GGUF run as it is tokenizes
        with llama.cpp's own vocabulary)."""
        self.__dict__["_tokenizer"] = tokenizer

    def _write(self, folder: Path) -> None:
        import shutil

        for f in self._files():
            target = folder / f.relative_to(self.folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        if self.folder is not None and folder.resolve() == self.folder.resolve():
            write_json_atomic(folder / META_FILE, self._meta_json())
            return folder
        super().save(folder)
        self.folder = folder
        return folder


def copy_companions(source: Path, target: Path) -> None:
    """Tokenizer, config and other files of the input folder; not its graph or edgesmith.json."""
    for f in source.iterdir():
        graph_file = f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data")
        if f.is_file() and not graph_file and f.name != META_FILE:
            shutil.copy2(f, target / f.name)
