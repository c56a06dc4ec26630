"""What the prune pass feeds its models and reads back: tokenized texts, example inputs for tracing,
the latency check's inputs, the first output of a forward, and mask-mean pooling."""

from __future__ import annotations

import copy
from typing import Any

import torch

from edgesmith.artifacts import TorchModel
from edgesmith.compress.pruning.costs import MACS_SEQ
from edgesmith.pooling import mean_pool


def _tokenized(model: TorchModel, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    tokenizer = model.tokenizer
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: enc[name] for name in model.input_names if name in enc}


def _pooled(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if output.dim() == 2:
        return output
    if mask is None:
        return output.mean(1)
    return mean_pool(output, mask)


def _example_inputs(model: TorchModel, seed: int) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, max(6, min(vocab, 1000)), (2, 16), generator=generator)
    feeds = {"input_ids": ids}
    if "attention_mask" in model.input_names:
        feeds["attention_mask"] = torch.ones_like(ids)
    return feeds


def _first_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return next(iter(output.values()))
    return output[0]


def _latency_feeds(model: TorchModel) -> dict[str, torch.Tensor]:
    config = model.config
    positions = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                 or MACS_SEQ + 2)
    seq = max(2, min(MACS_SEQ, int(positions) - 2))
    ids = torch.full((1, seq), 7, dtype=torch.long)
    feeds = {"input_ids": ids}
    if "attention_mask" in model.input_names:
        feeds["attention_mask"] = torch.ones_like(ids)
    return feeds
