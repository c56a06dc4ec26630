"""The pruning plan: how many layers, query heads and FFN channels each layer keeps, by uniform or
global allocation (heads removed whole KV groups at a time under grouped-query attention), and the
bisection that meets a ``params=`` / ``macs=`` budget with the analytic cost model."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from edgesmith.architectures import ArchSpec, LayerParts, ffn_width_of, heads_of, kv_heads_of
from edgesmith.compress.pruning.costs import LayerCost, layer_costs
from edgesmith.compress.pruning.importance import Scores
from edgesmith.errors import BadInput

if TYPE_CHECKING:
    from edgesmith.compress.pruning import PruneConfig

_BUDGET = re.compile(r"^\s*(params|macs)\s*=\s*([0-9.]+)\s*$")


def parse_budget(text: str) -> tuple[str, float]:
    """``"params=0.5"`` → ``("params", 0.5)``; BadInput-worthy ValueError otherwise."""
    match = _BUDGET.match(text)
    if not match:
        raise ValueError(f"budget {text!r} is not 'params=F' or 'macs=F' (F the fraction kept, e.g. params=0.6)")
    fraction = float(match.group(2))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"budget fraction must be between 0 and 1 (the fraction kept), got {fraction}")
    return match.group(1), fraction


@dataclass
class Plan:
    """Which layers stay (indices into the original layers), and for each of them the query heads
    removed and the FFN width kept."""

    keep_layers: list[int]
    heads_removed: list[int]
    ffn_kept: list[int]


def _head_step(heads: int, kv_heads: int) -> int:
    """Query heads are removed in steps of the KV head count (one per KV group)."""
    return kv_heads if kv_heads != heads else 1


def _min_heads(heads: int, kv_heads: int) -> int:
    """Query heads a layer keeps at least: 1, or with grouped-query attention 2 per KV head
    (torch-pruning 1.6 takes a layer left with 1 query head per KV head for plain multi-head
    attention and then prunes nothing)."""
    return 1 if kv_heads == heads else min(heads, 2 * kv_heads)


def _round_kept(kept: int, width: int, round_to: int) -> int:
    return min(width, kept - kept % round_to)


class _TooMuch(Exception):
    """A ratio would remove everything of some layer."""


def plan_layers(scores: Scores, ratio: float, count: int, strict: bool) -> list[int]:
    if ratio <= 0:
        return list(range(count))
    drop = max(1, int(ratio * count + 0.5))  # nearest whole layer, at least one
    if drop >= count:
        if strict:
            raise _TooMuch(f"layers={ratio} would remove all {count} layers; use a smaller ratio")
        drop = count - 1
    if scores.blocks is not None:  # one contiguous block: the start whose removal scores lowest
        block = scores.blocks(drop)
        start = min(range(len(block)), key=lambda s: (block[s], s))
        dropped = set(range(start, start + drop))
    else:
        order = sorted(range(count), key=lambda i: (scores.layers[i], i))
        dropped = set(order[:drop])
    return [i for i in range(count) if i not in dropped]


def plan_widths(parts: list[LayerParts], spec: ArchSpec, scores: Scores, keep: list[int], heads_ratio: float,
                ffn_ratio: float, allocation: str, round_to: int, strict: bool) -> tuple[list[int], list[int]]:
    """Heads removed and FFN width kept for each kept layer."""
    chosen = [parts[i] for i in keep]
    heads = [heads_of(p, spec) for p in chosen]
    steps = [_head_step(h, kv_heads_of(p, spec)) for h, p in zip(heads, chosen)]
    floors = [_min_heads(h, kv_heads_of(p, spec)) for h, p in zip(heads, chosen)]
    widths = [ffn_width_of(p) for p in chosen]
    if allocation == "global":
        removed = _global_heads([scores.heads[i] for i in keep], heads, steps, floors, heads_ratio)
        kept = _global_channels([scores.channels[i] for i in keep], widths, ffn_ratio, round_to)
        return removed, kept
    removed, kept = [], []
    for layer, (h, step, floor, width) in enumerate(zip(heads, steps, floors, widths)):
        r = 0
        if heads_ratio > 0:
            r = math.ceil(math.ceil(heads_ratio * h - 1e-9) / step) * step
            if r > h - floor:
                if strict:
                    what = f"all {h} heads" if floor == 1 else f"more than {h - floor} of {h} heads (2 query heads per KV head stay)"
                    raise _TooMuch(f"heads={heads_ratio} would remove {what} of layer {keep[layer]}; use a smaller ratio")
                r = h - floor
        removed.append(r)
        k = width
        if ffn_ratio > 0:
            k = _round_kept(int(width * (1 - ffn_ratio)), width, round_to)
            if k < 1:
                if strict:
                    raise _TooMuch(f"ffn={ffn_ratio} with round_to={round_to} would remove all {width} FFN "
                                   f"channels of layer {keep[layer]}; use a smaller ratio or round_to")
                k = min(width, round_to)
        kept.append(k)
    return removed, kept


def _global_heads(head_scores: list[torch.Tensor], heads: list[int], steps: list[int], floors: list[int],
                  ratio: float) -> list[int]:
    """Remove the ``ratio`` of all query heads that score lowest across layers, at least
    ``floors`` heads staying in each layer, counts rounded down to whole steps (GQA groups)."""
    if ratio <= 0:
        return [0] * len(heads)
    target = round(ratio * sum(heads))
    ranked = sorted((float(s), layer) for layer, layer_scores in enumerate(head_scores) for s in layer_scores)
    counts = [0] * len(heads)
    taken = 0
    for _, layer in ranked:
        if taken >= target:
            break
        if counts[layer] < heads[layer] - floors[layer]:
            counts[layer] += 1
            taken += 1
    return [c - c % step for c, step in zip(counts, steps)]


def _global_channels(channel_scores: list[torch.Tensor], widths: list[int], ratio: float, round_to: int) -> list[int]:
    """Keep the FFN channels that score highest across layers; each layer keeps a multiple of
    ``round_to`` (nearest) and at least ``round_to`` channels."""
    if ratio <= 0:
        return list(widths)
    flat = torch.cat(channel_scores)
    owner = torch.cat([torch.full((w,), i) for i, w in enumerate(widths)])
    target = int(round(ratio * flat.numel()))
    lowest = torch.argsort(flat, stable=True)[:target]
    removed = torch.bincount(owner[lowest], minlength=len(widths)).tolist()
    kept = []
    for width, gone in zip(widths, removed):
        k = width - gone
        k = int(round(k / round_to)) * round_to
        kept.append(max(min(width, round_to), min(width, k)))
    return kept


def predict_cost(costs: list[LayerCost], total: int, plan: Plan, parts: list[LayerParts], metric: str) -> float:
    """Parameters or MACs of the model after ``plan`` (analytic, no pruning done)."""
    value = float(total)
    kept = set(plan.keep_layers)
    for i, cost in enumerate(costs):
        if i not in kept:
            value -= cost.params if metric == "params" else cost.macs
    for i, removed, width in zip(plan.keep_layers, plan.heads_removed, plan.ffn_kept):
        cost = costs[i]
        gone = ffn_width_of(parts[i]) - width
        if metric == "params":
            value -= removed * cost.head_params + gone * cost.channel_params
        else:
            value -= removed * cost.head_macs + gone * cost.channel_macs
    return value


def make_plan(parts: list[LayerParts], spec: ArchSpec, scores: Scores, config: PruneConfig,
              ratios: dict[str, float], strict: bool) -> Plan:
    try:
        keep = plan_layers(scores, ratios["layers"], len(parts), strict)
        removed, kept = plan_widths(parts, spec, scores, keep, ratios["heads"], ratios["ffn"], config.allocation,
                                    config.round_to, strict)
    except _TooMuch as exc:
        raise BadInput(f"prune: {exc}") from exc
    return Plan(keep, removed, kept)


def search_budget(parts: list[LayerParts], spec: ArchSpec, scores: Scores, config: PruneConfig,
                  totals: dict[str, int]) -> tuple[Plan, dict[str, Any]]:
    """The smallest common ratio of the ``budget_prunes`` components whose plan meets the budget
    (bisection over the ratio; the analytic cost is monotone in it up to rounding)."""
    metric, fraction = parse_budget(config.budget or "")
    costs = layer_costs(parts, spec)
    target = fraction * totals[metric]

    def ratios_at(r: float) -> dict[str, float]:
        return {c: (r if c in config.budget_prunes else getattr(config, c)) for c in ("heads", "ffn", "layers")}

    def cost_at(r: float) -> tuple[Plan, float]:
        plan = make_plan(parts, spec, scores, config, ratios_at(r), strict=False)
        return plan, predict_cost(costs, totals[metric], plan, parts, metric)

    high = 0.99
    plan, cost = cost_at(high)
    if cost > target:
        reachable = cost / totals[metric]
        raise BadInput(f"prune: budget {config.budget} is out of reach by pruning {', '.join(config.budget_prunes)}: "
                       f"at most {1 - reachable:.0%} of the {metric} can go (the rest is embeddings and "
                       f"what every layer keeps); ask for {metric}={math.ceil(reachable * 100) / 100:.2f} or more, "
                       "or add components to budget_prunes")
    low = 0.0
    for _ in range(30):
        mid = (low + high) / 2
        if cost_at(mid)[1] <= target:
            high = mid
        else:
            low = mid
    plan, cost = cost_at(high)
    return plan, {"budget_metric": metric, "budget_fraction": fraction, "budget_ratio": round(high, 4),
                  "budget_predicted_fraction": round(cost / totals[metric], 4)}
