"""Sparsity in the Linear weights of the layers: unstructured (a fraction, per layer or global) and
2:4 semi-structured zeros, the check of the 2:4 pattern, and the sparsity achieved."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgesmith.architectures import ArchSpec, is_linear, layers_of
from edgesmith.compress.pruning.importance import element_scores

if TYPE_CHECKING:
    from edgesmith.compress.pruning import PruneConfig


def _layer_linears(module: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.Module]]:
    names = {id(m): n for n, m in module.named_modules()}
    return [(names[id(m)], m) for layer in layers_of(module, spec) for m in layer.modules() if is_linear(m)]


def apply_sparsity(module: nn.Module, spec: ArchSpec, config: PruneConfig) -> dict[str, Any]:
    """Zero weights of the layers' Linears (Linear form: weights are (out, in))."""
    generator = torch.Generator().manual_seed(config.seed)
    targets = _layer_linears(module, spec)
    skipped: list[str] = []
    with torch.no_grad():
        if config.pattern == "2:4":
            for name, m in targets:
                if m.in_features % 4:
                    skipped.append(name)
                    continue
                scores = element_scores(m.weight, config.importance, generator)
                groups = scores.reshape(m.out_features, -1, 4)
                lowest = groups.topk(2, dim=-1, largest=False).indices
                mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, lowest, False)
                m.weight.mul_(mask.reshape(m.weight.shape))
        elif config.sparsity > 0:
            scores = {name: element_scores(m.weight, config.importance, generator) for name, m in targets}
            if config.allocation == "global":
                flat = torch.cat([s.reshape(-1) for s in scores.values()])
                k = int(round(config.sparsity * flat.numel()))
                threshold = flat.kthvalue(k).values if k > 0 else None
                for name, m in targets:
                    if threshold is not None:
                        m.weight.masked_fill_(scores[name] <= threshold, 0.0)
            else:
                for name, m in targets:
                    k = int(round(config.sparsity * m.weight.numel()))
                    if k:
                        lowest = scores[name].reshape(-1).topk(k, largest=False).indices
                        m.weight.view(-1)[lowest] = 0.0
    return {"sparsity_skipped": skipped} if skipped else {}


