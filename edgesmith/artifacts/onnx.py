"""ONNX models (:class:`OnnxModel`): a graph in a folder, checked once per process when loaded."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from edgesmith.artifacts.base import META_FILE, FolderArtifact, check_task
from edgesmith.errors import BadInput, first_line
from edgesmith.storage import sha256_file

ONNX_FILE = "model.onnx"


@dataclass
class OnnxModel(FolderArtifact):
    """An ONNX graph in a folder (``model.onnx`` plus tokenizer and config files)."""

    kind: ClassVar[str] = "onnx"

    @property
    def path(self) -> Path:
        assert self.folder is not None
        return self.folder / ONNX_FILE

    def _graph(self):
        import onnx

        return onnx.load(str(self.path), load_external_data=False).graph

    @property
    def input_names(self) -> list[str]:
        graph = self._graph()
        weights = {init.name for init in graph.initializer}
        return [i.name for i in graph.input if i.name not in weights]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self._graph().output]

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for f in sorted(self.folder.iterdir()):
            if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data")):
                digest.update(f.name.encode())
                digest.update(sha256_file(f).encode())
        digest.update(self.task.encode())
        return digest.hexdigest()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir()
                   if f.is_file() and f.name != META_FILE and (f.suffix in (".onnx", ".data")
                                                               or f.name.endswith(".onnx_data")))

    @classmethod
    def load_folder(cls, path: Path, meta: dict) -> OnnxModel:
        if not (path / ONNX_FILE).exists():
            raise BadInput(f"{path}: edgesmith.json says kind 'onnx' but {ONNX_FILE} is missing; re-create the artifact")
        check_onnx_file(path / ONNX_FILE)
        return cls(task=meta.get("task", "feature-extraction"), name=meta.get("name", path.name),
                   lineage=meta.get("lineage", []), meta=meta.get("meta", {}), folder=path)


#: files that passed check_onnx_file in this process, by (path, size, mtime): a file is checked once
_CHECKED_ONNX: set[tuple[str, int, int]] = set()


def check_onnx_file(path: Path) -> None:
    """onnx's checker on the file (the graph, and that external data stays inside its folder);
    BadInput naming the file when it fails. About a second for a 500 MB graph, once per process."""
    import onnx

    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not an ONNX model file; re-create the artifact")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED_ONNX:
        return
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises several types for a damaged file
        raise BadInput(f"{path}: not a valid ONNX model ({first_line(exc)[:200]})") from exc
    _CHECKED_ONNX.add(key)


def load_onnx_file(path: Path, task: str | None) -> OnnxModel:
    """A bare ``.onnx`` file as an OnnxModel (its task from its outputs unless given)."""
    import onnx

    check_onnx_file(path)
    folder = path.parent
    if task is None:
        outputs = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
        task = "sequence-classification" if outputs == ["logits"] else "feature-extraction"
    check_task(task)
    if path.name != ONNX_FILE:
        # keep the artifact contract (model.onnx inside its folder) without touching the user's file
        import tempfile

        from edgesmith.storage import link_or_copy_tree

        tmp = Path(tempfile.mkdtemp(prefix="edgesmith-onnx-"))
        link_or_copy_tree(folder, tmp)
        (tmp / path.name).rename(tmp / ONNX_FILE)
        folder = tmp
    return OnnxModel(task=task, name=path.stem, folder=folder, meta={"source": str(path)})
