"""Checks of a pruned model: that it still runs with the expected output shape, its fidelity to its
parent (causal LMs: KL divergence, top-1 agreement and perplexity of the next-token distributions on
held-out corpus text, :mod:`edgesmith.lm_quality`; other models: cosine of pooled outputs), and a
quick interleaved torch latency check against the parent."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from edgesmith.artifacts import TorchModel
from edgesmith.compress.pruning.feeds import _first_output, _pooled, _tokenized
from edgesmith.errors import EdgesmithError

#: interleaved rounds × iterations per round of the quick torch latency check (batch 1)
LATENCY_ROUNDS = 5
LATENCY_ITERATIONS = 4


def _verify_forward(module: nn.Module, feeds: dict[str, torch.Tensor], expected: torch.Size) -> None:
    try:
        with torch.no_grad():
            out = _first_output(module(**feeds))
    except Exception as exc:
        raise EdgesmithError(f"prune: the pruned model does not run ({type(exc).__name__}: {exc})") from exc
    if out.shape != expected or not torch.isfinite(out).all():
        raise EdgesmithError(f"prune: the pruned model's output has shape {tuple(out.shape)} "
                             f"(expected {tuple(expected)}) or non-finite values")


def fidelity(parent: TorchModel, child: TorchModel, texts: list[str], max_length: int) -> float | None:
    """Mean cosine of mask-mean-pooled outputs (hidden states or logits) of child vs parent."""
    if parent.tokenizer is None or not texts:
        return None
    cosines = []
    with torch.no_grad():
        for start in range(0, len(texts), 16):
            feeds = _tokenized(parent, texts[start:start + 16], max_length)
            mask = feeds.get("attention_mask")
            a = _pooled(_first_output(parent.module(**feeds)).float(), mask)
            b = _pooled(_first_output(child.module(**feeds)).float(), mask)
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    return round(float(torch.cat(cosines).mean()), 4)


def lm_fidelity_report(parent: TorchModel, child: TorchModel) -> dict[str, Any]:
    """Decoder fidelity of ``child`` to ``parent`` on held-out corpus passages (KL of the next-token
    distributions, top-1 agreement, perplexity of both); passages fit the model's positions."""
    from edgesmith.lm_quality import PASSAGE_TOKENS, lm_fidelity

    if parent.tokenizer is None:
        return {}
    config = parent.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    tokens = min(PASSAGE_TOKENS, int(positions) // 2) if positions else PASSAGE_TOKENS
    result = lm_fidelity(child, parent, tokenizer=parent.tokenizer, passage_tokens=tokens)
    return {"fidelity_kld": round(result["kld"], 6), "fidelity_top1": round(result["top1"], 4),
            "fidelity_perplexity": round(result["perplexity"], 4),
            "fidelity_perplexity_parent": round(result["perplexity_reference"], 4),
            "fidelity_tokens": result["tokens"], "fidelity_data": "held-out corpus passages (lm_quality)"}


def latency_check(parent: nn.Module, child: nn.Module, feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Torch latency of both at batch 1: LATENCY_ROUNDS rounds of LATENCY_ITERATIONS timed runs
    each (after one warm-up run), the order of the two rotating every round; speedup with its
    bootstrap confidence interval (``edgesmith.profiling.bootstrap_speedup``)."""
    from edgesmith.stats import bootstrap_speedup, verdict_of

    samples: dict[str, list[float]] = {"parent": [], "child": []}
    models = {"parent": parent, "child": child}
    with torch.inference_mode():
        for m in models.values():
            m(**feeds)
        for round_index in range(LATENCY_ROUNDS):
            order = ["parent", "child"] if round_index % 2 == 0 else ["child", "parent"]
            for name in order:
                for _ in range(LATENCY_ITERATIONS):
                    t0 = time.perf_counter()
                    models[name](**feeds)
                    samples[name].append((time.perf_counter() - t0) * 1000.0)
    speedup, low, high = bootstrap_speedup(samples["parent"], samples["child"])
    ordered = {k: sorted(v) for k, v in samples.items()}
    return {"latency_ms_before": round(ordered["parent"][len(ordered["parent"]) // 2], 3),
            "latency_ms_after": round(ordered["child"][len(ordered["child"]) // 2], 3),
            "latency_speedup": round(speedup, 3), "latency_speedup_ci": [round(low, 3), round(high, 3)],
            "latency_verdict": verdict_of(low, high),
            "latency_setup": f"torch eager, batch 1, seq {feeds['input_ids'].shape[1]}, {LATENCY_ROUNDS} interleaved "
                             f"rounds x {LATENCY_ITERATIONS} runs, {torch.get_num_threads()} threads"}
