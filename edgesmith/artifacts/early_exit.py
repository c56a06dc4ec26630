"""Early-exit models (:class:`EarlyExitModel`): ONNX segments with exit heads and a calibrated policy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgesmith.artifacts.base import META_FILE, FolderArtifact, output_name
from edgesmith.errors import BadInput, first_line
from edgesmith.storage import sha256_file

EXIT_POLICY_FILE = "policy.json"
EXIT_TORCH_DIR = "torch"


@dataclass
class EarlyExitModel(FolderArtifact):
    """A network cut into consecutive ONNX segments (``segment-NN.onnx``: embeddings + the first
    block + its exit head, then each next block + its exit head) with ``policy.json`` (the exit
    policy, its calibrated threshold, and each segment's file, layers, inputs and outputs), the
    tokenizer and config files, and ``torch/`` (the PyTorch weights and exit heads, for the torch
    runtime). ONNX Runtime and torch sessions run it through an exit controller
    (:mod:`edgesmith.early_exit.runtime`)."""

    kind: ClassVar[str] = "early-exit"

    @property
    def policy_data(self) -> dict[str, Any]:
        assert self.folder is not None
        path = self.folder / EXIT_POLICY_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
            raise BadInput(f"{path}: cannot read the exit policy ({first_line(exc, 160)}); re-create the early-exit "
                           "model") from exc
        if not isinstance(data, dict) or not isinstance(data.get("segments"), list) or not data["segments"]:
            raise BadInput(f"{path}: no segments listed; re-create the early-exit model")
        inside = self.folder.resolve()
        for seg in data["segments"]:
            name = seg.get("file") if isinstance(seg, dict) else None
            if not isinstance(name, str) or not (self.folder / name).resolve().is_relative_to(inside):
                raise BadInput(f"{path}: segment file {name!r} is not a file inside the model folder; re-create the "
                               "early-exit model")
        return data

    @property
    def segment_paths(self) -> list[Path]:
        assert self.folder is not None
        return [self.folder / seg["file"] for seg in self.policy_data["segments"]]

    @property
    def input_names(self) -> list[str]:
        return list(self.policy_data.get("inputs") or ["input_ids", "attention_mask"])

    @property
    def output_names(self) -> list[str]:
        return [output_name(self.task), "exit_layer"]

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for f in self._files():
            if f.name == META_FILE:  # the backbone's record holds lineage and timings, not content
                continue
            digest.update(str(f.relative_to(self.folder)).encode())
            digest.update(sha256_file(f).encode())
        digest.update(self.task.encode())
        return digest.hexdigest()

    def size_bytes(self) -> int:
        """Bytes of the ONNX segments (what is deployed)."""
        return sum(p.stat().st_size for p in self.segment_paths)

    @classmethod
    def load_folder(cls, path: Path, meta: dict) -> EarlyExitModel:
        model = cls(task=meta.get("task", "sequence-classification"), name=meta.get("name", path.name),
                    lineage=meta.get("lineage", []), meta=meta.get("meta", {}), folder=path)
        missing = [p.name for p in model.segment_paths if not p.exists()]
        if missing:
            raise BadInput(f"{path}: segment file(s) {', '.join(missing)} missing; re-create the early-exit model")
        return model
