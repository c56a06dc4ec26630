"""Accuracy-aware quantization: return the fewest weight nodes to float until a quality gate holds.

Sensitivity is measured by *removal from the fully quantized graph*: quantize every candidate,
then return a group of nodes to float and measure how much of the gate metric comes back. Errors
of quantized nodes compound (a node's activation error becomes the next node's input), so what a
node costs depends on what else is quantized; measuring removals from the graph that would ship
ranks nodes by what returning them to float actually buys there, which one-at-a-time
quantization (each node alone on a float graph) does not.

To keep the number of quantize-and-evaluate rounds small, the search goes kinds first, then
nodes (FIELD-NOTES: on MiniLM the loss of static INT8 sits in one kind of op, the six FFN
down-projections, not in one layer):

1. quantize all candidates; if the gate holds, nothing stays float;
2. return each kind (a module path with its layer index dropped, e.g.
   ``encoder.layer.*.output.dense``) to float and measure; add kinds to the float set in order of
   what they gain until the gate holds (all kinds float = the parent graph: if even that fails the
   gate, :class:`GateFailed`);
3. refine node by node inside the float set: measure what quantizing each of its nodes again
   costs, then quantize them again cheapest first, keeping each only if the gate still holds.

K + N_float + small rounds instead of the N (or N^2) of node-by-node greedy search.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgesmith.errors import GateFailed

log = logging.getLogger(__name__)

Metrics = dict[str, float]


@dataclass
class Gate:
    """``max_drop`` gates checked by :func:`edgesmith.quality.check_gates` against a reference."""

    max_drop: dict[str, float]
    reference_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return next(iter(self.max_drop))

    def failures(self, metrics: Metrics) -> list[dict]:
        from edgesmith.quality import check_gates

        return check_gates(metrics, self.reference_metrics, self.max_drop)

    def holds(self, metrics: Metrics) -> bool:
        return not self.failures(metrics)


@dataclass
class SearchResult:
    float_nodes: list[str]
    metrics: Metrics
    all_quantized: Metrics
    kinds: list[dict[str, Any]]
    node_costs: dict[str, float]
    evaluations: int


def _rounded(metrics: Metrics) -> Metrics:
    return {k: round(float(v), 6) for k, v in metrics.items()}


def search_fallback(candidates: dict[str, str], evaluate: Callable[[set[str]], Metrics], gate: Gate,
                    label: str) -> SearchResult:
    """The smallest float set (node names) found among ``candidates`` ({node: kind}) for which
    ``evaluate(float_set)`` meets ``gate``. Raises :class:`GateFailed` when no set with at least
    one quantized node meets it."""
    cache: dict[frozenset[str], Metrics] = {}

    def run(float_set: set[str]) -> Metrics:
        key = frozenset(float_set)
        if key not in cache:
            cache[key] = evaluate(set(float_set))
            log.debug("%d nodes float: %s", len(key), cache[key])
        return cache[key]

    metric = gate.primary
    base = run(set())
    kinds: dict[str, list[str]] = {}
    for node, kind in candidates.items():
        kinds.setdefault(kind, []).append(node)
    if gate.holds(base):
        return SearchResult([], base, base, [], {}, len(cache))

    # 2. kinds, by what returning each to float gains
    gains = []
    for kind, nodes in kinds.items():
        value = run(set(nodes))[metric]
        gains.append({"kind": kind, "nodes": len(nodes), f"{metric}_when_float": round(value, 6),
                      "gain": round(value - base[metric], 6)})
    gains.sort(key=lambda g: (-g["gain"], g["nodes"]))
    float_set: set[str] = set()
    for entry in gains:
        float_set |= set(kinds[entry["kind"]])
        if gate.holds(run(float_set)):
            break
    else:
        worst = gate.failures(run(float_set))[0]
        raise GateFailed(f"quantize of {label}: even with every candidate node in float the gate fails: "
                         f"{worst['metric']} drops {worst['drop']:.4f} > {worst['max_drop']:g} against the "
                         "reference; loosen max_drop or compare against the parent (gate_against: parent)",
                         gate.failures(run(float_set)))

    # 3. nodes inside the float set, cheapest to quantize again first
    current = run(float_set)[metric]
    costs = {node: round(current - run(float_set - {node})[metric], 6) for node in sorted(float_set)}
    for node in sorted(costs, key=lambda n: (costs[n], n)):
        trial = float_set - {node}
        if gate.holds(run(trial)):
            float_set = trial
    if set(candidates) <= float_set:
        raise GateFailed(f"quantize of {label}: the gate {gate.max_drop} holds only with every candidate node in "
                         "float, i.e. with nothing quantized; loosen max_drop or use another mode",
                         gate.failures(base))
    return SearchResult(sorted(float_set), _rounded(run(float_set)), _rounded(base), gains,
                        {n: costs[n] for n in sorted(float_set)}, len(cache))
