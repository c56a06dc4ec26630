"""The analytic cost model of pruning: parameters and MACs of a model (one sequence of ``MACS_SEQ``
tokens), and per layer what one query head or one FFN channel costs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from edgesmith.architectures import (
    ArchSpec,
    LayerParts,
    arch_spec,
    ffn_width_of,
    head_dim_of,
    heads_of,
    in_features,
    is_linear,
    kv_heads_of,
    layer_parts,
    out_features,
)
from edgesmith.errors import BadInput

#: tokens of the sequence the MACs are counted for
MACS_SEQ = 128


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_macs(module: nn.Module, tokens: int) -> int:
    return sum(tokens * in_features(m) * out_features(m) for m in module.modules() if is_linear(m))


def count_macs(module: nn.Module, seq: int = MACS_SEQ) -> int:
    """MACs of one sequence of ``seq`` tokens (see the module docstring for what counts)."""
    total = _linear_macs(module, seq)
    try:
        spec = arch_spec(module)
    except BadInput:
        return total
    for part in layer_parts(module, spec):
        total += 2 * seq * seq * heads_of(part, spec) * head_dim_of(part, spec)
    return total


@dataclass
class LayerCost:
    """A layer's parameters/MACs and what one query head or one FFN channel of it costs."""

    params: int
    macs: int
    head_params: float
    head_macs: float
    channel_params: float
    channel_macs: float


def _params_of(modules: Sequence[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False))


def layer_costs(parts: list[LayerParts], spec: ArchSpec, seq: int = MACS_SEQ) -> list[LayerCost]:
    """Per-layer costs for the budget search. A query head carries its q rows and attention-out
    columns (and, without grouped-query attention, its k and v rows) and its share of the two
    attention matmuls; an FFN channel its rows of the FFN input(s) and column of the FFN output."""
    costs = []
    for part in parts:
        heads, kv_heads, dim = heads_of(part, spec), kv_heads_of(part, spec), head_dim_of(part, spec)
        width = ffn_width_of(part)
        per_head = part.qkv if kv_heads == heads else part.qkv[:1]
        head_weights = sum(in_features(m) * out_features(m) for m in per_head)
        head_params = (_params_of(per_head) + in_features(part.attention_out) * out_features(part.attention_out)) / heads
        head_macs = seq * (head_weights + in_features(part.attention_out) * out_features(part.attention_out)) / heads
        head_macs += 2 * seq * seq * dim
        ffn_weights = sum(in_features(m) * out_features(m) for m in part.ffn_in)
        out_weight = in_features(part.ffn_out) * out_features(part.ffn_out)
        channel_params = (_params_of(part.ffn_in) + out_weight) / width
        channel_macs = seq * (ffn_weights + out_weight) / width
        macs = _linear_macs(part.layer, seq) + 2 * seq * seq * heads * dim
        costs.append(LayerCost(count_params(part.layer), macs, head_params, head_macs, channel_params, channel_macs))
    return costs
