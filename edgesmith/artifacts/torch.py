"""PyTorch models (:class:`TorchModel`), and Hugging Face folders loaded as one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgesmith.artifacts.base import Artifact, check_task, output_name
from edgesmith.artifacts.paths import is_default_model
from edgesmith.artifacts.tokenizer import load_tokenizer
from edgesmith.errors import BadInput, bad_safetensors, first_line, is_safetensors_error


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

    @classmethod
    def load_folder(cls, path: Path, meta: dict, *, trust_remote_code: bool = False) -> TorchModel:
        """A torch artifact folder: stock ``from_pretrained``, or the module rebuilt from its structure."""
        structure = meta.get("structure") or {}
        task = meta.get("task", "feature-extraction")
        if not structure:
            model = load_huggingface(path, task=task, trust_remote_code=trust_remote_code)
        else:
            from edgesmith.structure import build_with_structure

            module = build_with_structure(path, task, structure, trust_remote_code=trust_remote_code)
            model = cls(task=task, module=module, tokenizer=load_tokenizer(path), structure=structure)
        model.name = meta.get("name", path.name)
        model.lineage = meta.get("lineage", [])
        model.meta = meta.get("meta", {})
        return model


def task_of_config(config) -> str:
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation"
    return "feature-extraction"


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
    check_task(task)
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
    tokenizer = load_tokenizer(path)
    name = "minilm" if is_default_model(path) else path.name
    return TorchModel(task=task, name=name, module=module, tokenizer=tokenizer,
                      meta={"source": str(path)})


def weights_file_of(folder: Path) -> Path:
    """The folder's safetensors weights (``model.safetensors``, or the pattern of its shards)."""
    single = folder / "model.safetensors"
    if single.exists() or not any(folder.glob("model-*-of-*.safetensors")):
        return single
    return folder / "model-*-of-*.safetensors"
