"""Importance for pruning: per-weight scores (l1, l2, first-order Taylor, random), the Taylor
(diagonal Fisher) scores gathered on data, torch-pruning's importance objects, and the scores of
each layer, query head and FFN channel that the plan ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgesmith.architectures import (
    ArchSpec,
    LayerParts,
    ffn_width_of,
    heads_of,
    is_linear,
    kv_heads_of,
)
from edgesmith.artifacts import TorchModel
from edgesmith.compress.pruning.feeds import _first_output, _pooled, _tokenized
from edgesmith.errors import BadInput

if TYPE_CHECKING:
    from edgesmith.compress.pruning import PruneConfig


def element_scores(weight: nn.Parameter, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance of each weight: |w| (l1), w² (l2), |w·g| (taylor: ``weight.grad`` holds the
    accumulated Fisher score divided by w, see :func:`taylor_scores`), or uniform random."""
    w = weight.detach()
    if kind == "l1":
        return w.abs()
    if kind == "l2":
        return w.pow(2)
    if kind == "taylor":
        if weight.grad is None:
            return torch.zeros_like(w)
        return (w * weight.grad).abs()
    return torch.rand(w.shape, generator=generator)


def _tp_importance(kind: str):
    import torch_pruning as tp

    if kind == "random":
        return tp.importance.RandomImportance()
    if kind == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.MagnitudeImportance(p=1 if kind == "l1" else 2)


def taylor_scores(module: nn.Module, model: TorchModel, texts: list[str], config: PruneConfig) -> dict[str, Any]:
    """Accumulate first-order Taylor (diagonal Fisher) scores Σ_b (w ⊙ g_b)² over a few batches and
    store them in each parameter's ``.grad`` as score / w, so that ``|w · grad|`` — what
    torch-pruning's TaylorImportance and :func:`element_scores` read — is the score.

    The loss of batch b: for ``text-generation`` models, the language-modelling loss (next-token
    cross-entropy); for encoders and classifiers, which have no label-free loss, a random
    projection Σ_i u_i · pooled_i of each row's mask-mean-pooled output (or logits) with u_i ~ N(0, I)
    drawn per batch: then E[(w·g)²] is the squared first-order change of the pooled outputs when w
    is removed, which is what fidelity measures.
    """
    if not texts:
        raise BadInput("prune: importance='taylor' needs data: give --data FILE (CLI), a 'data:' section "
                       "(recipe) or Context(texts=[...]) (Python)")
    if model.tokenizer is None:
        raise BadInput(f"prune: importance='taylor' needs a tokenizer beside {model.name} to read the data; "
                       "save one with tokenizer.save_pretrained")
    size, batches = config.taylor_batch_size, config.taylor_batches
    pool = [t for t in texts if t.strip()][: size * batches]
    params = [p for p in module.parameters()]
    totals = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(config.seed)
    module.zero_grad(set_to_none=True)
    used = 0
    for start in range(0, len(pool), size):
        feeds = _tokenized(model, pool[start:start + size], config.max_length)
        with torch.enable_grad():
            if model.task == "text-generation":
                labels = feeds["input_ids"].clone()
                if "attention_mask" in feeds:
                    labels[feeds["attention_mask"] == 0] = -100
                loss = module(**feeds, labels=labels).loss
            else:
                out = _first_output(module(**feeds))
                pooled = _pooled(out, feeds.get("attention_mask"))
                direction = torch.randn(pooled.shape, generator=generator)
                loss = (pooled * direction).sum()
            loss.backward()
        for total, p in zip(totals, params):
            if p.grad is not None:
                total += (p.detach() * p.grad).pow(2)
        module.zero_grad(set_to_none=True)
        used += 1
    with torch.no_grad():
        for total, p in zip(totals, params):
            w = p.detach()
            p.grad = torch.where(w != 0, total / torch.where(w != 0, w, torch.ones_like(w)), torch.zeros_like(w))
    return {"taylor_batches": used, "taylor_texts": len(pool),
            "taylor_loss": "language-modelling loss" if model.task == "text-generation"
            else "random projections of the mean-pooled output"}


@dataclass
class Scores:
    """Importance of each layer, of each query head and of each FFN channel (per layer); with
    block selection, ``blocks(n)`` scores removing layers [l, l + n) for every start l (lowest goes)."""

    layers: list[float]
    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    blocks: Callable[[int], list[float]] | None = None


def _mean_rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean score of each of ``groups`` equal blocks of rows of an (out, in) score matrix."""
    return weight.reshape(groups, -1).mean(1)


def compute_scores(parts: list[LayerParts], spec: ArchSpec, kind: str, seed: int) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    layer_scores, head_scores, channel_scores = [], [], []
    for part in parts:
        def score(m: nn.Module) -> torch.Tensor:
            return element_scores(m.weight, kind, generator)

        weights = [m for m in part.layer.modules() if is_linear(m)]
        layer_scores.append(float(torch.cat([score(m).reshape(-1) for m in weights]).mean()))
        heads, kv_heads = heads_of(part, spec), kv_heads_of(part, spec)
        head = _mean_rows(score(part.qkv[0]), heads) + _mean_rows(score(part.attention_out).t(), heads)
        if kv_heads == heads:
            head = head + sum(_mean_rows(score(m), heads) for m in part.qkv[1:])
        head_scores.append(head)
        width = ffn_width_of(part)
        channel = sum(score(m).mean(1) for m in part.ffn_in) + score(part.ffn_out).mean(0)
        channel_scores.append(channel.reshape(width))
    return Scores(layer_scores, head_scores, channel_scores)
