"""Where a model's transformer layers are (from :mod:`edgesmith.architectures`), and depth-reduced students.

Which layers a depth-reduced student keeps, and the depth-reduced copy of the teacher."""

from __future__ import annotations

import copy
import re
from typing import Any

from torch import nn

from edgesmith.architectures import ARCHITECTURES, arch_spec
from edgesmith.artifacts import TorchModel
from edgesmith.compress.distillation.config import DistillConfig
from edgesmith.errors import BadInput

# ---------------------------------------------------------------------------------------------
# Layers, depth-reduced students
# ---------------------------------------------------------------------------------------------


#: where the list of transformer layers lives, relative to ``module.base_model``, in models of a
#: type the architecture table (:mod:`edgesmith.architectures`) does not list
OTHER_LAYER_PATHS = ("decoder.layers", "transformer.h")


def layer_paths(module: nn.Module) -> tuple[str, ...]:
    """Where the list of layers may be, in the order tried: the architecture's own path when the
    table knows the model type, then every path of the table, then :data:`OTHER_LAYER_PATHS`."""
    try:
        own: tuple[str, ...] = (arch_spec(module).layers,)
    except BadInput:  # a model type the table does not list
        own = ()
    return tuple(dict.fromkeys((*own, *(spec.layers for spec in ARCHITECTURES), *OTHER_LAYER_PATHS)))


def find_layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The full module path and the ModuleList of the transformer layers."""
    base = getattr(module, "base_model", module)
    names = {id(m): name for name, m in module.named_modules()}
    paths = layer_paths(module)
    for path in paths:
        obj: Any = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj):
            return names[id(obj)], obj
    raise BadInput(f"distill cannot find the transformer layers of {type(module).__name__}; "
                   f"known layouts: {', '.join(paths)}")


def num_layers(module: nn.Module) -> int:
    return len(find_layers(module)[1])


def chosen_layers(config: DistillConfig, teacher_layers: int) -> list[int] | None:
    if config.every_k is not None:
        if config.every_k > teacher_layers:
            raise BadInput(f"distill: every_k={config.every_k} but the teacher has only {teacher_layers} layers")
        return list(range(config.every_k - 1, teacher_layers, config.every_k))
    if config.keep_layers is not None:
        bad = [i for i in config.keep_layers if not 0 <= i < teacher_layers]
        if bad:
            raise BadInput(f"distill: keep_layers names layer {bad[0]}, but the teacher has layers 0-{teacher_layers - 1}")
        return sorted(config.keep_layers)
    return None


def _remap_structure(structure: dict[str, dict], prefix: str, keep: list[int]) -> dict[str, dict]:
    """Rename per-layer structure entries to the kept layers' new indices; drop the others."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)(\..*)?$")
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, dict] = {}
    for path, values in structure.items():
        match = pattern.match(path)
        if match is None:
            out[path] = copy.deepcopy(values)
        elif int(match.group(1)) in new_index:
            out[f"{prefix}.{new_index[int(match.group(1))]}{match.group(2) or ''}"] = copy.deepcopy(values)
    return out


def depth_reduced(teacher: TorchModel, keep: list[int]) -> TorchModel:
    """A copy of ``teacher`` that keeps only the layers ``keep`` (config and structure updated)."""
    module = copy.deepcopy(teacher.module)
    prefix, layers = find_layers(module)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new
    parent_path, _, child = prefix.rpartition(".")
    setattr(module.get_submodule(parent_path) if parent_path else module, child, kept)
    config = getattr(module, "config", None)
    if config is not None:
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in keep]
    return teacher.derive(module=module, structure=_remap_structure(teacher.structure, prefix, keep))
