"""Structured pruning carried out: whole layers dropped (depth), heads and FFN channels removed with
torch-pruning to the plan's sizes (width), and the config and ``structure`` that describe the
pruned shapes afterwards."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgesmith.architectures import (
    ArchSpec,
    _get,
    ffn_width_of,
    head_dim_of,
    heads_of,
    in_features,
    is_conv1d,
    kv_heads_of,
    layer_parts,
    layers_of,
    out_features,
)
from edgesmith.compress.pruning.feeds import _first_output
from edgesmith.compress.pruning.importance import _tp_importance
from edgesmith.compress.pruning.plan import Plan
from edgesmith.errors import EdgesmithError

if TYPE_CHECKING:
    from edgesmith.compress.pruning import PruneConfig


def drop_layers(module: nn.Module, spec: ArchSpec, keep: list[int]) -> None:
    """Keep only the layers ``keep``; renumber ``layer_idx`` and update the config's layer count."""
    layers = layers_of(module, spec)
    if len(keep) == len(layers):
        return
    base = getattr(module, "base_model", module)
    parent_path, _, name = spec.layers.rpartition(".")
    parent = _get(base, parent_path) if parent_path else base
    setattr(parent, name, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(layers_of(module, spec)):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx") and isinstance(sub.layer_idx, int):
                sub.layer_idx = new_index
    config = module.config
    setattr(config, spec.config_layers, len(keep))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [layer_types[i] for i in keep]


def prune_widths(module: nn.Module, spec: ArchSpec, plan: Plan, config: PruneConfig,
                 example_inputs: dict[str, torch.Tensor]) -> None:
    """Prune heads and FFN channels of the (already depth-pruned) layers to the plan's sizes."""
    import torch_pruning as tp

    parts = layer_parts(module, spec)
    prunable: set[nn.Module] = set()
    ratios: dict[Any, float] = {}
    head_ratios: dict[nn.Module, float] = {}
    num_heads: dict[nn.Module, int] = {}
    for part, removed, kept in zip(parts, plan.heads_removed, plan.ffn_kept):
        heads, kv_heads = heads_of(part, spec), kv_heads_of(part, spec)
        for linear, count in zip(part.qkv, (heads, kv_heads, kv_heads)):
            num_heads[linear] = count
        if removed > 0:
            prunable.update(part.qkv)
            ratios[tuple(part.qkv)] = 0.5  # > 0 so head removal runs; prune_head_dims=False keeps dims
            for linear in part.qkv:
                head_ratios[linear] = (removed - 0.5) / heads  # torch-pruning takes ceil(ratio * heads)
        width = ffn_width_of(part)
        if kept < width:
            prunable.update(part.ffn_in)
            key = part.ffn_in[0] if len(part.ffn_in) == 1 else tuple(part.ffn_in)
            ratios[key] = (width - kept) / width - 1e-9  # it keeps int(width * (1 - ratio))
    if not prunable:
        return
    ignored: list[Any] = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and m not in prunable]
    # parameters of modules torch-pruning does not know (Llama's RMSNorm): left out of the graph,
    # else each becomes the root of a group spanning the hidden size of the whole model (very slow)
    ignored += [p for m in module.modules() if not isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm))
                for p in m.parameters(recurse=False)]
    use_cache = getattr(module.config, "use_cache", None)
    if use_cache:
        module.config.use_cache = False  # a KV cache in the traced graph makes torch-pruning's grouping hang
    with torch.enable_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        torch.manual_seed(config.seed)
        pruner = tp.pruner.BasePruner(
            module, example_inputs, importance=_tp_importance(config.importance), global_pruning=False,
            pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=ignored, round_to=config.round_to,
            num_heads=dict(num_heads), prune_num_heads=bool(head_ratios), prune_head_dims=False,
            head_pruning_ratio=0.0, head_pruning_ratio_dict=head_ratios or None,
            output_transform=lambda out: _first_output(out).sum(),
        )
        pruner.step()
    if use_cache:
        module.config.use_cache = use_cache
    for part, removed, kept, heads_before in zip(parts, plan.heads_removed, plan.ffn_kept,
                                                 [num_heads[p.qkv[0]] for p in parts]):
        dim = head_dim_of(part, spec)
        heads = out_features(part.qkv[0]) // dim
        if spec.heads_attr:
            setattr(part.attention, spec.heads_attr, heads)
        if spec.all_head_attr:
            setattr(part.attention, spec.all_head_attr, heads * dim)
        if spec.kv_groups_attr:
            setattr(part.attention, spec.kv_groups_attr, heads // kv_heads_of(part, spec))
        if heads != heads_before - removed or ffn_width_of(part) != kept:
            raise EdgesmithError(f"prune: torch-pruning left {heads} heads / {ffn_width_of(part)} FFN channels "
                                 f"where the plan says {heads_before - removed} / {kept}")


def describe_structure(module: nn.Module, spec: ArchSpec) -> dict[str, dict[str, Any]]:
    """Update the config where it can say the new shapes; return what it cannot say.

    Equal FFN widths go to the config's FFN field; Llama's equal head counts to
    ``num_attention_heads`` with ``head_dim`` set explicitly. Otherwise each module whose shape
    or attributes differ from what the config builds is recorded by module path.
    """
    config = module.config
    names = {id(m): name for name, m in module.named_modules()}
    parts = layer_parts(module, spec)
    structure: dict[str, dict[str, Any]] = {}
    heads = [heads_of(p, spec) for p in parts]
    if spec.config_head_dim:
        setattr(config, spec.config_head_dim, head_dim_of(parts[0], spec))
        if len(set(heads)) == 1:
            setattr(config, spec.config_heads, heads[0])
    config_heads = int(getattr(config, spec.config_heads))
    for part, count in zip(parts, heads):
        if count == config_heads:
            continue
        values: dict[str, Any] = {}
        if spec.heads_attr:
            values[spec.heads_attr] = count
        if spec.all_head_attr:
            values[spec.all_head_attr] = int(getattr(part.attention, spec.all_head_attr))
        if spec.kv_groups_attr:
            values[spec.kv_groups_attr] = int(getattr(part.attention, spec.kv_groups_attr))
        structure[names[id(part.attention)]] = values
    widths = {ffn_width_of(p) for p in parts}
    if len(widths) == 1:
        setattr(config, spec.config_ffn, widths.pop())
    else:
        for part in parts:
            for m in part.ffn_in:
                structure[names[id(m)]] = {"nf": out_features(m)} if is_conv1d(m) else {"out_features": out_features(m)}
            if not is_conv1d(part.ffn_out):
                structure[names[id(part.ffn_out)]] = {"in_features": in_features(part.ffn_out)}
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 option: the scaling depends on the layer's original index, which depth pruning changed
        for part in parts:
            structure.setdefault(names[id(part.attention)], {})["scaling"] = float(part.attention.scaling)
    return structure
