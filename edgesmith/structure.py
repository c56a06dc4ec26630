"""Rebuild a torch model whose shapes its stock config cannot describe (a head-pruned BERT, say).

The folder holds the stock ``config.json``, ``model.safetensors`` and, in ``edgesmith.json``, a
``structure``: attribute values per module path (``{"encoder.layer.0.attention.self":
{"num_attention_heads": 6, "all_head_size": 192}}``). The model is built from the config, every
module whose saved tensors have other shapes is replaced by one of the saved shapes, the
structure's attributes are set, and the weights are loaded strictly. Nothing is unpickled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesmith.errors import BadInput, bad_safetensors, first_line, is_safetensors_error

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


def _damaged(folder: Path, what: str) -> BadInput:
    return BadInput(f"{folder}: {what}; the artifact folder is damaged, re-create it")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (never torch.load)."""
    from safetensors import safe_open

    if path.is_dir():
        raise BadInput(f"{path}: is a folder, not a weights file; re-save the model")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors' own error type for a damaged header or file
        if is_safetensors_error(exc):
            raise bad_safetensors(path, exc) from exc
        raise


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    if path.exists():
        return path
    if any(folder.glob("model-*-of-*.safetensors")):
        raise BadInput(f"{folder}: sharded safetensors weights are not supported for a pruned model; "
                       "save it again with a larger max_shard_size")
    raise _damaged(folder, f"{WEIGHTS_FILE} is missing")


def _fresh_model(folder: Path, task: str, trust_remote_code: bool) -> nn.Module:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, ValueError, and the strict config classes' own validation errors
        raise _damaged(folder, f"config.json cannot be read ({first_line(exc)})") from exc
    return auto_class(task).from_config(config, trust_remote_code=trust_remote_code)


def _resized(old: nn.Module, shapes: dict[str, torch.Size], dtype: torch.dtype) -> nn.Module:
    """A module like ``old`` with the parameter shapes given (keyed by parameter name)."""
    if isinstance(old, nn.Linear):
        out_features, in_features = shapes["weight"]
        return nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=dtype)
    if isinstance(old, nn.LayerNorm):
        shape = shapes.get("weight", shapes.get("bias"))
        return nn.LayerNorm(tuple(shape), eps=old.eps, elementwise_affine=old.elementwise_affine,
                            bias=old.bias is not None, dtype=dtype)
    if type(old).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: weight (in, out)
        from transformers.pytorch_utils import Conv1D

        in_features, out_features = shapes["weight"]
        return Conv1D(out_features, in_features).to(dtype)
    if isinstance(old, nn.Embedding):
        num, dim = shapes["weight"]
        return nn.Embedding(num, dim, padding_idx=old.padding_idx, dtype=dtype)
    raise TypeError(type(old).__name__)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _reshape_modules(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Replace every module whose saved parameters have other shapes than the built ones."""
    state = model.state_dict()
    by_module: dict[str, dict[str, torch.Size]] = {}
    for key, tensor in tensors.items():
        if key not in state:
            raise _damaged(folder, f"{WEIGHTS_FILE} holds '{key}', which the model built from config.json lacks")
        if state[key].shape != tensor.shape:
            owner, _, param = key.rpartition(".")
            by_module.setdefault(owner, {})[param] = tensor.shape
    for path, shapes in by_module.items():
        old = model.get_submodule(path)
        dtype = next(iter(tensors[f"{path}.{p}"] for p in shapes)).dtype
        try:
            new = _resized(old, shapes, dtype)
        except (TypeError, KeyError, ValueError) as exc:
            raise _damaged(folder, f"saved shapes of '{path}' ({type(old).__name__}) "
                                   f"{ {k: tuple(v) for k, v in shapes.items()} } cannot be rebuilt") from exc
        _replace(model, path, new)
        log.debug("rebuilt %s with shapes %s", path, shapes)


def _apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]], folder: Path) -> None:
    for path, values in structure.items():
        try:
            module = model.get_submodule(path)
        except AttributeError as exc:
            raise _damaged(folder, f"edgesmith.json's structure names module '{path}', which the model lacks") from exc
        if not isinstance(values, dict):
            raise _damaged(folder, f"edgesmith.json's structure for '{path}' is not a mapping")
        for name, value in values.items():
            if not hasattr(module, name):
                raise _damaged(folder, f"edgesmith.json's structure sets '{name}' on '{path}' "
                                       f"({type(module).__name__}), which has no such attribute")
            setattr(module, name, value)


def _complete_tied(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the tensors save_pretrained leaves out because they share storage with a saved one."""
    state = model.state_dict(keep_vars=True)
    by_storage: dict[tuple[int, int], list[str]] = {}
    for key, tensor in state.items():
        if tensor.device.type != "meta" and tensor.numel() > 0:
            by_storage.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(key)
    complete = dict(tensors)
    for keys in by_storage.values():
        saved = [k for k in keys if k in tensors]
        if saved:
            for key in keys:
                complete.setdefault(key, tensors[saved[0]])
    return complete


def build_with_structure(folder: Path, task: str, structure: dict, trust_remote_code: bool = False) -> nn.Module:
    """Build the model of an edgesmith torch folder whose shapes its config cannot say."""
    folder = Path(folder)
    if not isinstance(structure, dict):
        raise _damaged(folder, "edgesmith.json's structure is not a mapping")
    model = _fresh_model(folder, task, trust_remote_code)
    weights = _weights_file(folder)
    tensors = read_tensors(weights)
    _reshape_modules(model, tensors, folder)
    _apply_structure(model, structure, folder)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    complete = _complete_tied(model, tensors)
    missing = sorted(set(model.state_dict()) - set(complete))
    if missing:
        raise BadInput(f"{weights}: lacks {len(missing)} weight(s) the model needs ({', '.join(missing[:3])}"
                       f"{', …' if len(missing) > 3 else ''}); the artifact folder is damaged, re-create it")
    try:
        model.load_state_dict(complete, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]  # torch's first line only says "Error(s) in loading"
        raise BadInput(f"{weights}: the weights do not fit the model ({reason}); the artifact folder is damaged, "
                       "re-create it") from exc
    return model.eval()


def auto_class(task: str):
    """The transformers Auto class that loads a model for ``task``."""
    import transformers

    return {
        "feature-extraction": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "text-generation": transformers.AutoModelForCausalLM,
    }[task]
