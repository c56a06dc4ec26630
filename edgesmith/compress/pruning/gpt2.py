"""GPT-2's prunable form: every ``Conv1D`` becomes an ``nn.Linear`` and the fused ``c_attn`` is split
into q/k/v Linears with an attention forward that uses them (torch-pruning knows neither Conv1D nor
the (3, heads, head_dim) layout of the fused projection), and the way back after pruning."""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch
from torch import nn

from edgesmith.architectures import ArchSpec, in_features, layers_of, out_features
from edgesmith.errors import BadInput


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    linear = nn.Linear(in_features(conv), out_features(conv), bias=conv.bias is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    if conv.weight.grad is not None:
        linear.weight.grad = conv.weight.grad.t().contiguous()
    return linear


def _conv1d_from_linears(linears: Sequence[nn.Linear]) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    weight = torch.cat([lin.weight.detach().t() for lin in linears], dim=1)
    conv = Conv1D(weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(torch.cat([lin.bias.detach() for lin in linears]))
    return conv


def _split_linear(linear: nn.Linear, parts: int) -> list[nn.Linear]:
    size = linear.out_features // parts
    out = []
    for i in range(parts):
        piece = nn.Linear(linear.in_features, size, bias=True, dtype=linear.weight.dtype)
        rows = slice(i * size, (i + 1) * size)
        with torch.no_grad():
            piece.weight.copy_(linear.weight[rows])
            piece.bias.copy_(linear.bias[rows])
        if linear.weight.grad is not None:
            piece.weight.grad = linear.weight.grad[rows].clone()
        out.append(piece)
    return out


def _gpt2_split_forward(self, hidden_states, *args, **kwargs):
    """GPT-2 attention on split q/k/v Linears: traced by torch-pruning only (heads as (heads, head_dim))."""
    batch, seq, _ = hidden_states.shape
    q, k, v = (lin(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
               for lin in (self.es_query, self.es_key, self.es_value))
    weights = torch.softmax(q @ k.transpose(-1, -2) * self.scaling, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, seq, -1)
    return self.c_proj(out), None


def to_prunable(module: nn.Module, spec: ArchSpec) -> None:
    """GPT-2: Conv1D → Linear everywhere in the layers, c_attn split into q/k/v (gradients kept)."""
    if spec.name != "GPT-2":
        return
    for layer in layers_of(module, spec):
        attn = layer.attn
        if hasattr(attn, "q_attn"):
            raise BadInput("prune: GPT-2 with cross-attention is not supported")
        fused = _linear_from_conv1d(attn.c_attn)
        attn.es_query, attn.es_key, attn.es_value = _split_linear(fused, 3)
        del attn.c_attn
        attn.c_proj = _linear_from_conv1d(attn.c_proj)
        layer.mlp.c_fc = _linear_from_conv1d(layer.mlp.c_fc)
        layer.mlp.c_proj = _linear_from_conv1d(layer.mlp.c_proj)
        attn.forward = types.MethodType(_gpt2_split_forward, attn)


def from_prunable(module: nn.Module, spec: ArchSpec) -> None:
    """Undo :func:`to_prunable`: fuse q/k/v into c_attn, Linear → Conv1D, the stock forward back."""
    if spec.name != "GPT-2":
        return
    for layer in layers_of(module, spec):
        attn = layer.attn
        attn.c_attn = _conv1d_from_linears([attn.es_query, attn.es_key, attn.es_value])
        width = attn.es_query.out_features
        del attn.es_query, attn.es_key, attn.es_value
        del attn.forward
        attn.c_proj = _conv1d_from_linears([attn.c_proj])
        layer.mlp.c_fc = _conv1d_from_linears([layer.mlp.c_fc])
        layer.mlp.c_proj = _conv1d_from_linears([layer.mlp.c_proj])
        attn.split_size = width
        attn.num_heads = width // attn.head_dim
