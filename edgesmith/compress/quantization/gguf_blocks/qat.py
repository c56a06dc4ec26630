"""Quantization-aware distillation into a block format: the student runs with the file's values.

Every block linear becomes a :class:`BlockLinear`: its forward uses
:func:`edgesmith.gguf.blocks.fake_quant` of (weight, scales), the exact values llama.cpp will compute
from the written blocks, with straight-through gradients to the weight and LSQ-style gradients to
the scales. The student is trained against the FP32 teacher's next-token distributions (the
distillation objective, logit KL) by edgesmith's training loop (AdamW, warm-up, progress bar,
checkpoints and exact resume, DDP under torchrun), and the blocks written afterwards are
:func:`BlockLinear.blocks` of the trained (weight, scales): what the last forward pass saw.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.gguf.blocks import BlockQuant, codes_for, fake_quant, from_torch, values_of


class BlockLinear(nn.Module):
    """A linear layer whose weight is quantized to ``fmt`` blocks in every forward pass."""

    def __init__(self, linear: nn.Linear, scales: torch.Tensor, fmt: str, weight: torch.Tensor | None = None):
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        source = linear.weight if weight is None else weight
        self.weight = nn.Parameter(source.detach().float().clone())
        self.scales = nn.Parameter(scales.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant(self.weight, self.scales, self.fmt).to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def blocks(self) -> BlockQuant:
        return from_torch(self.fmt, self.weight, self.scales)

    def dequantized(self) -> torch.Tensor:
        with torch.no_grad():
            return values_of(codes_for(self.weight, self.scales, self.fmt), self.scales, self.fmt)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}"


def wrap(module: nn.Module, plan: dict[str, tuple[str, torch.Tensor, torch.Tensor]]) -> dict[str, BlockLinear]:
    """Replace the linears named in ``plan`` ({path: (fmt, weight, scales)}) by BlockLinears, in place."""
    wrapped = {}
    for path, (fmt, weight, scales) in plan.items():
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        layer = BlockLinear(getattr(parent, child), scales, fmt, weight=weight)
        setattr(parent, child, layer)
        wrapped[path] = layer
    return wrapped


def unwrap(module: nn.Module, wrapped: dict[str, BlockLinear]) -> dict[str, BlockQuant]:
    """Put plain linears holding the dequantized values back (so the module saves and exports as a
    Hugging Face model whose weights are exactly the file's) and return each tensor's blocks."""
    blocks = {}
    for path, layer in wrapped.items():
        blocks[path] = layer.blocks()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent_path, _, child = path.rpartition(".")
        setattr(module.get_submodule(parent_path) if parent_path else module, child, linear)
    return blocks


def freeze_embeddings(module: nn.Module) -> None:
    """The token embedding (and a tied head) is written at Q8_0 by the writer from its float values;
    it stays as the source had it."""
    for name, param in module.named_parameters():
        if "embed_tokens" in name or name.startswith("lm_head"):
            param.requires_grad_(False)
