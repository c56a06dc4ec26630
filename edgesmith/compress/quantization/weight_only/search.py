"""The accuracy-aware search: the fewest layer groups at the fallback precision that hold ``max_kld``.

Layer groups (all MatMuls of one decoder layer, the LM head alone) are ranked by the KL divergence
each costs when it alone is quantized, on probe passages from the calibration side of the corpus;
the most sensitive go to the fallback precision (doubling, then bisecting) until the KL on the
held-out passages (:mod:`edgesmith.lm_quality`) is within the budget. If even every group at the
fallback misses it, :class:`~edgesmith.errors.GateFailed` (exit 3).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

from edgesmith.artifacts import OnnxModel, copy_companions
from edgesmith.compress.quantization.weight_only.candidates import Candidates
from edgesmith.compress.quantization.weight_only.compose import Variant, compose
from edgesmith.compress.quantization.weight_only.config import WeightOnlyConfig
from edgesmith.compress.quantization.weight_only.passages import PROBE_OFFSET
from edgesmith.errors import GateFailed
from edgesmith.onnx_graph.edit import save_graph

log = logging.getLogger(__name__)


class Trials:
    """Writes composed graphs into one scratch folder and scores them against a reference."""

    def __init__(self, parent: OnnxModel, original, variants: dict[str, Variant], folder: Path):
        self.parent = parent
        self.original = original
        self.variants = variants
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        copy_companions(parent.folder, folder)
        self.evaluations = 0

    def score(self, assignment: dict[str, str], reference) -> dict[str, float]:
        from edgesmith.lm_quality import onnx_logits

        save_graph(compose(self.original, self.variants, assignment), self.folder)
        trial = OnnxModel(task=self.parent.task, name=self.parent.name, meta=copy.deepcopy(self.parent.meta),
                          folder=self.folder)
        self.evaluations += 1
        return reference.compare(onnx_logits(trial))


def search_fallback(parent: OnnxModel, original, variants: dict[str, Variant], candidates: Candidates,
                    base: dict[str, str], cfg: WeightOnlyConfig, work: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Return the assignment that holds ``max_kld`` with the fewest layer groups at the fallback
    precision, and the search's report. GateFailed when even all groups at the fallback miss it."""
    from edgesmith.lm_quality import Reference, calibration_batches, heldout_batches, onnx_logits

    assert cfg.max_kld is not None
    started = time.perf_counter()
    fallback = "int8" if cfg.fallback == "int8" and cfg.bits == 4 else "float"
    parent_fn = onnx_logits(parent)
    held_out = Reference.build(parent_fn, heldout_batches(parent.tokenizer))
    probe = Reference.build(parent_fn, calibration_batches(parent.tokenizer, count=cfg.probe_passages,
                                                           tokens=cfg.calibration_tokens, batch_size=cfg.probe_passages,
                                                           offset=PROBE_OFFSET))
    trials = Trials(parent, original, variants, work / "trials")
    main = [n for n, label in base.items() if label == "main"]
    report: dict[str, Any] = {"max_kld": cfg.max_kld, "against": "parent graph", "fallback": fallback,
                              "probe_tokens": probe.tokens, "heldout_tokens": held_out.tokens}
    full = trials.score(base, held_out)
    report["all_quantized"] = rounded(full)
    if full["kld"] <= cfg.max_kld:
        report.update({"groups_at_fallback": {}, "final": report["all_quantized"], "evaluations": trials.evaluations,
                       "seconds": round(time.perf_counter() - started, 2)})
        return base, report
    groups = sorted({candidates.groups[n] for n in main})
    costs = {}
    for group in groups:
        only = {n: ("main" if candidates.groups[n] == group else "float") for n in main}
        costs[group] = trials.score(only, probe)["kld"]
    ranked = sorted(groups, key=lambda g: costs[g], reverse=True)

    def assignment_with(k: int) -> dict[str, str]:
        chosen = set(ranked[:k])
        return {n: (fallback if n in main and candidates.groups[n] in chosen else label) for n, label in base.items()}

    measured: dict[int, dict[str, float]] = {0: full}

    def holds(k: int) -> bool:
        if k not in measured:
            measured[k] = trials.score(assignment_with(k), held_out)
        return measured[k]["kld"] <= cfg.max_kld

    # the smallest k that holds: double until one holds, then bisect (KL falls as groups return)
    low, k = 0, 1
    while k < len(ranked) and not holds(k):
        low, k = k, min(2 * k, len(ranked))
    if k >= len(ranked) and not holds(len(ranked)):
        worst = measured[len(ranked)]["kld"]
        how = ("fallback: float, or " if fallback == "int8" else "") + "a larger max_kld"
        raise GateFailed(f"weight-only {cfg.precision} ({cfg.method}): even with every layer group at {fallback} the KL "
                         f"divergence to the parent is {worst:.4g} > max_kld {cfg.max_kld:g}; use {how}",
                         failures=[{"metric": "kld", "value": worst, "limit": cfg.max_kld}])
    high = k
    while high - low > 1:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid
    if fallback == "float" and high == len(ranked):
        raise GateFailed(f"weight-only {cfg.precision} ({cfg.method}): no layer group can be quantized within max_kld "
                         f"{cfg.max_kld:g} (all quantized: KL {full['kld']:.4g}); raise max_kld")
    kept = ranked[:high]
    report.update({
        "ranking": "KL on probe passages with only that group quantized, rest float",
        "group_costs": {g: round(costs[g], 6) for g in ranked},
        "groups_at_fallback": {g: {"precision": fallback, "nodes": candidates.members(g),
                                   "kld_if_quantized": round(costs[g], 6)} for g in kept},
        "final": rounded(measured[high]), "evaluations": trials.evaluations,
        "seconds": round(time.perf_counter() - started, 2)})
    log.info("accuracy-aware %s: %d of %d layer groups at %s for KL %.4g <= %g (%d evaluations)", cfg.precision,
             high, len(ranked), fallback, measured[high]["kld"], cfg.max_kld, trials.evaluations)
    return assignment_with(high), report


def rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}
