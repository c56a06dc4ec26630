"""The architectures the prune pass knows (BERT, RoBERTa, DistilBERT, GPT-2, Llama with grouped-query
attention), each declared once as an :class:`ArchSpec`; the modules of a transformer layer that
pruning touches (:class:`LayerParts`), their head counts and FFN widths; and the Linear helpers that
also read GPT-2's ``Conv1D`` (weights stored (in, out))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgesmith.errors import BadInput


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable parts of one architecture are. Paths are dotted attribute paths.

    ``layers`` is relative to the base model (``model.base_model``); the others to one layer.
    ``qkv`` holds the q, k, v projections (one path when they are fused, as GPT-2's ``c_attn``);
    ``ffn_in`` the FFN input projection(s) (Llama: gate and up). On the ``attention`` module:
    ``heads_attr`` the head count (None where the module has none: Llama), ``head_dim_attr`` the
    head size (kept), ``all_head_attr`` heads × head size, ``kv_groups_attr`` query heads per KV
    head. Config fields: ``config_heads``, ``config_kv_heads``, ``config_head_dim`` (a field
    stock configs read, so pruned heads are expressible), ``config_ffn``, ``config_layers``.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    qkv: tuple[str, ...]
    attention_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    head_dim_attr: str
    heads_attr: str | None
    all_head_attr: str | None
    kv_groups_attr: str | None
    config_heads: str
    config_kv_heads: str | None
    config_head_dim: str | None
    config_ffn: str
    config_layers: str

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1

_BERT_LIKE = dict(
    layers="encoder.layer", attention="attention.self",
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
    head_dim_attr="attention_head_size", heads_attr="num_attention_heads", all_head_attr="all_head_size",
    kv_groups_attr=None, config_heads="num_attention_heads", config_kv_heads=None, config_head_dim=None,
    config_ffn="intermediate_size", config_layers="num_hidden_layers",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(name="BERT", model_types=("bert",), **_BERT_LIKE),
    ArchSpec(name="RoBERTa", model_types=("roberta",), **_BERT_LIKE),
    ArchSpec(
        name="DistilBERT", model_types=("distilbert",), layers="transformer.layer", attention="attention",
        qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"), attention_out="attention.out_lin",
        ffn_in=("ffn.lin1",), ffn_out="ffn.lin2", head_dim_attr="attention_head_size", heads_attr="n_heads",
        all_head_attr=None, kv_groups_attr=None, config_heads="n_heads", config_kv_heads=None,
        config_head_dim=None, config_ffn="hidden_dim", config_layers="n_layers",
    ),
    ArchSpec(
        name="GPT-2", model_types=("gpt2",), layers="h", attention="attn", qkv=("attn.c_attn",),
        attention_out="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj", head_dim_attr="head_dim",
        heads_attr="num_heads", all_head_attr="split_size", kv_groups_attr=None, config_heads="n_head",
        config_kv_heads=None, config_head_dim=None, config_ffn="n_inner", config_layers="n_layer",
    ),
    ArchSpec(
        name="Llama", model_types=("llama",), layers="layers", attention="self_attn",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attention_out="self_attn.o_proj",
        ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", head_dim_attr="head_dim",
        heads_attr=None, all_head_attr=None, kv_groups_attr="num_key_value_groups",
        config_heads="num_attention_heads", config_kv_heads="num_key_value_heads", config_head_dim="head_dim",
        config_ffn="intermediate_size", config_layers="num_hidden_layers",
    ),
)


def supported_architectures() -> list[str]:
    return [spec.name for spec in ARCHITECTURES]


def arch_spec(module: nn.Module) -> ArchSpec:
    """The description of ``module``'s architecture, or BadInput naming the supported ones."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    what = f"{type(module).__name__} (model_type {model_type!r})" if model_type else type(module).__name__
    raise BadInput(
        f"prune does not support {what}; supported architectures: {', '.join(supported_architectures())} "
        "(Hugging Face models of these families)"
    )


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def out_features(module: nn.Module) -> int:
    return int(module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0])


def in_features(module: nn.Module) -> int:
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module stores."""
    return module.weight.t() if is_conv1d(module) else module.weight


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass
class LayerParts:
    """The modules of one transformer layer that pruning touches."""

    layer: nn.Module
    attention: nn.Module
    qkv: list[nn.Module]
    attention_out: nn.Module
    ffn_in: list[nn.Module]
    ffn_out: nn.Module


def layers_of(module: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    base = getattr(module, "base_model", module)
    try:
        return _get(base, spec.layers)
    except AttributeError as exc:
        raise BadInput(f"{type(module).__name__} does not have the layout of a {spec.name} model ({exc})") from exc


def layer_parts(module: nn.Module, spec: ArchSpec) -> list[LayerParts]:
    """The parts of every layer (GPT-2 in its prunable form: the split q/k/v Linears)."""
    parts = []
    try:
        for layer in layers_of(module, spec):
            attention = _get(layer, spec.attention)
            if spec.fused_qkv and hasattr(attention, "es_query"):
                qkv = [attention.es_query, attention.es_key, attention.es_value]
            else:
                qkv = [_get(layer, p) for p in spec.qkv]
            parts.append(LayerParts(layer, attention, qkv, _get(layer, spec.attention_out),
                                    [_get(layer, p) for p in spec.ffn_in], _get(layer, spec.ffn_out)))
    except AttributeError as exc:
        raise BadInput(f"{type(module).__name__} does not have the layout of a {spec.name} model ({exc})") from exc
    for part in parts:
        if not hasattr(part.attention, spec.head_dim_attr):
            raise BadInput(f"{type(part.attention).__name__} has no '{spec.head_dim_attr}': "
                           f"not the {spec.name} attention this pass knows")
    return parts


def head_dim_of(part: LayerParts, spec: ArchSpec) -> int:
    return int(getattr(part.attention, spec.head_dim_attr))


def heads_of(part: LayerParts, spec: ArchSpec) -> int:
    """Query heads of a layer."""
    if spec.heads_attr:
        return int(getattr(part.attention, spec.heads_attr))
    return out_features(part.qkv[0]) // head_dim_of(part, spec)


def kv_heads_of(part: LayerParts, spec: ArchSpec) -> int:
    if spec.kv_groups_attr and len(part.qkv) == 3:
        return out_features(part.qkv[1]) // head_dim_of(part, spec)
    return heads_of(part, spec)


def ffn_width_of(part: LayerParts) -> int:
    return out_features(part.ffn_in[0])


def layer_sizes(module: nn.Module, spec: ArchSpec) -> tuple[list[int], list[int]]:
    """Query heads and FFN width of every layer."""
    parts = layer_parts(module, spec)
    return [heads_of(p, spec) for p in parts], [ffn_width_of(p) for p in parts]


def is_2_4(weight_out_in: torch.Tensor) -> bool:
    """True when every four consecutive weights along the input dimension hold at least two zeros."""
    out, inp = weight_out_in.shape
    if inp % 4:
        return False
    return bool(((weight_out_in.reshape(out, -1, 4) == 0).sum(-1) >= 2).all())


def sparsity_report(module: nn.Module, spec: ArchSpec) -> dict[str, Any]:
    """Achieved sparsity per module and per layer of the layers' Linear weights, and whether all of
    them follow the 2:4 pattern."""
    per_module: dict[str, float] = {}
    per_layer: list[float] = []
    all_2_4 = True
    names = {id(m): n for n, m in module.named_modules()}
    for layer in layers_of(module, spec):
        zeros = total = 0
        for m in layer.modules():
            if not is_linear(m):
                continue
            w = linear_weight(m).detach()
            z = int((w == 0).sum())
            per_module[names[id(m)]] = round(z / w.numel(), 4)
            zeros, total = zeros + z, total + w.numel()
            all_2_4 = all_2_4 and is_2_4(w)
        per_layer.append(round(zeros / total, 4) if total else 0.0)
    return {"sparsity_per_layer": per_layer, "sparsity_per_module": per_module, "pattern_2_4": all_2_4}
