"""Pruning: attention heads, FFN channels and whole layers (structured, torch-pruning DepGraph),
unstructured magnitude sparsity and 2:4 semi-structured sparsity, on Hugging Face transformers.

What a transformer layer looks like to the pass (where its layers are, the names of q/k/v, the
attention output, the FFN input(s) and output, and the attributes that hold head counts) is
declared once per architecture in an :class:`ArchSpec`: BERT, RoBERTa, DistilBERT, GPT-2 and
Llama (grouped-query attention). The pruning itself is architecture-free.

The pass runs in this order:

1. Taylor importance only: gradients on a few batches of data (see :func:`taylor_scores`).
2. GPT-2 only: every ``Conv1D`` becomes an ``nn.Linear`` and the fused ``c_attn`` is split into
   q/k/v Linears with an attention forward that uses them (torch-pruning knows neither Conv1D
   nor the (3, heads, head_dim) layout of the fused projection); undone at step 6.
3. A plan: how many layers, query heads and FFN channels each layer keeps. Uniform allocation
   gives every layer the same ratio; global allocation ranks heads (and channels) of all layers
   together by importance, so layers keep different sizes. A budget (``params=0.5`` or
   ``macs=0.5``: keep at most that fraction of the parameters or MACs) is met by a bisection over
   one ratio applied to the components named in ``budget_prunes``, with the analytic cost model
   of :func:`layer_costs`.
4. Depth: the layers of lowest importance are removed — by the weights' importance, or measured
   on data before anything is modified (``layer_importance``: the angular distance between the
   hidden states entering and leaving a layer or block, or the KL divergence of the output
   distribution when it is skipped; ``layer_selection='block'`` removes one contiguous run, as in
   Gromov et al.; see ``pruning_depth``); the config's layer count (and ``layer_types``) and each
   layer's ``layer_idx`` are updated (a KV cache indexes layers by it).
5. Width: torch-pruning (``BasePruner``, local scopes) with one head ratio and one FFN ratio per
   layer, chosen so that its rounding gives exactly the planned sizes (checked afterwards).
   Hidden size is kept: every Linear that is not q/k/v or an FFN input is an ignored layer.
   Grouped-query attention: heads are removed in equal numbers from every key/value group, so
   query groups stay consistent with their KV heads; ``num_key_value_groups`` is updated.
6. Sparsity: magnitude (or the chosen criterion's) zeros in the Linear weights of the layers,
   unstructured (a fraction) or 2:4 (two zeros in every four consecutive weights along the
   input dimension); achieved sparsity is measured per module and the 2:4 pattern verified.

Traps of torch-pruning 1.6 avoided here: heads are silently not removed when the attention
group's channel ratio is 0 (q/k/v get a channel ratio > 0; with ``prune_head_dims=False`` it
removes no head dimension); the modules' head attributes are not updated by torch-pruning (set
here); ``global_pruning=True`` removes no GQA heads (global allocation is computed here and
executed as per-layer local ratios).

A stock config can say FFN width, depth, and (Llama, which has ``head_dim``) a pruned head
count; it cannot say a head count that differs from ``hidden_size / head_dim`` (BERT, RoBERTa,
DistilBERT, GPT-2) or sizes that differ between layers. What it cannot say is recorded in the
artifact's ``structure`` (module path → attribute values), from which
:func:`edgesmith.structure.build_with_structure` rebuilds the model.

Cost model (:func:`count_macs`): the multiply-accumulates of one sequence of ``MACS_SEQ`` = 128
tokens: every Linear (and GPT-2 Conv1D) counts ``tokens × in × out``; attention counts the two
matmuls ``QKᵀ`` and ``AV``, ``2 × tokens² × heads × head_dim`` per layer (no causal halving);
embeddings, norms, softmax and activations count nothing. Zeros of sparsity count as MACs
(dense kernels do the work anyway).

This module holds the pass and its config; the steps live beside it: ``pruning_architectures``
(the ArchSpecs and layer parts), ``pruning_gpt2`` (step 2), ``pruning_importance`` (scores,
Taylor), ``pruning_depth`` (measured layer importance: angular, kl), ``pruning_costs`` (the cost
model), ``pruning_plan`` (step 3 and the budget search), ``pruning_structured`` (steps 4 and 5,
the structure afterwards), ``pruning_sparsity`` (step 6), ``pruning_checks`` (forward, fidelity
and latency checks) and ``pruning_feeds`` (model inputs and outputs). Their public names are re-exported here: ``from edgesmith.compress.pruning import ...``
works as before.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from edgesmith.architectures import (
    ARCHITECTURES,
    ArchSpec,
    LayerParts,
    arch_spec,
    ffn_width_of,
    head_dim_of,
    heads_of,
    in_features,
    is_2_4,
    is_conv1d,
    is_linear,
    kv_heads_of,
    layer_parts,
    layer_sizes,
    layers_of,
    linear_weight,
    out_features,
    sparsity_report,
    supported_architectures,
)
from edgesmith.artifacts import TorchModel
from edgesmith.compress.pruning.checks import (
    LATENCY_ITERATIONS,
    LATENCY_ROUNDS,
    _verify_forward,
    fidelity,
    latency_check,
    lm_fidelity_report,
)
from edgesmith.compress.pruning.costs import MACS_SEQ, LayerCost, count_macs, count_params, layer_costs
from edgesmith.compress.pruning.depth import DepthScores, measure_depth
from edgesmith.compress.pruning.feeds import _example_inputs, _first_output, _latency_feeds
from edgesmith.compress.pruning.gpt2 import from_prunable, to_prunable
from edgesmith.compress.pruning.importance import Scores, compute_scores, element_scores, taylor_scores
from edgesmith.compress.pruning.plan import (
    Plan,
    make_plan,
    parse_budget,
    plan_layers,
    plan_widths,
    predict_cost,
    search_budget,
)
from edgesmith.compress.pruning.sparsity import apply_sparsity
from edgesmith.compress.pruning.structured import describe_structure, drop_layers, prune_widths
from edgesmith.passes import Context, Pass, PassConfig, register

log = logging.getLogger(__name__)

#: texts the pass measures fidelity (cosine of mean-pooled outputs) on; causal LMs are scored by
#: KL / top-1 / perplexity on held-out corpus passages instead (``lm_fidelity_report``)
FIDELITY_TEXTS = 64

Component = Literal["heads", "ffn", "layers"]


class PruneConfig(PassConfig):
    """What to remove and how to choose it.

    Ratios: ``heads`` (query heads per layer), ``ffn`` (FFN channels per layer), ``layers`` (whole
    layers). ``budget`` (``"params=0.5"`` / ``"macs=0.5"``: keep at most that fraction) replaces
    the ratios of the components in ``budget_prunes`` by one searched ratio. ``sparsity`` zeros a
    fraction of the weights of the layers' Linears; ``pattern="2:4"`` zeros two of every four.
    ``importance``: l1 / l2 weight magnitude, first-order ``taylor`` (needs data), ``random``.
    ``allocation``: ``uniform`` (same ratio in every layer) or ``global`` (ranked across layers).
    ``layer_importance``: which layers go when layers are removed: ``weights`` (the ``importance``
    criterion on the layer's weights), ``angular`` (angular distance between the hidden states
    entering and leaving the layer/block) or ``kl`` (KL divergence of the output distribution when
    the layer/block alone is skipped), both measured on ``layer_texts`` texts of the data (the
    run's data, else the shipped corpus). ``layer_selection``: ``individual`` layers of lowest
    importance, or one contiguous ``block`` (needs angular or kl).
    """

    heads: float = 0.0
    ffn: float = 0.0
    layers: float = 0.0
    importance: Literal["l1", "l2", "taylor", "random"] = "l2"
    allocation: Literal["uniform", "global"] = "uniform"
    layer_importance: Literal["weights", "angular", "kl"] = "weights"
    layer_selection: Literal["individual", "block"] = "individual"
    layer_texts: int = 64
    budget: str | None = None
    budget_prunes: list[Component] = ["heads", "ffn"]
    sparsity: float = 0.0
    pattern: Literal["2:4"] | None = None
    round_to: int = 8
    seed: int = 0
    taylor_batches: int = 8
    taylor_batch_size: int = 8
    max_length: int = 128
    check_latency: bool = True

    @field_validator("heads", "ffn", "layers", "sparsity")
    @classmethod
    def _ratio_in_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError("a pruning ratio must be at least 0 and below 1 (0.25 removes a quarter)")
        return value

    @field_validator("round_to", "taylor_batches", "taylor_batch_size", "max_length", "layer_texts")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be 1 or more (round_to=1 disables rounding)")
        return value

    @field_validator("budget")
    @classmethod
    def _budget_format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parse_budget(value)
        return value.replace(" ", "")

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.budget is not None:
            if not self.budget_prunes:
                raise ValueError("budget_prunes is empty: name what the budget may prune (heads, ffn, layers)")
            given = [c for c in self.budget_prunes if getattr(self, c) > 0]
            if given:
                raise ValueError(f"give either a budget or ratios for {', '.join(given)}, not both "
                                 "(the budget searches those ratios)")
        if self.pattern is not None and self.sparsity > 0:
            raise ValueError("give either sparsity (unstructured) or pattern='2:4' (which is 50 %), not both")
        removes_layers = self.layers > 0 or (self.budget is not None and "layers" in self.budget_prunes)
        if (self.layer_importance != "weights" or self.layer_selection != "individual") and not removes_layers:
            raise ValueError(f"layer_importance={self.layer_importance} / layer_selection={self.layer_selection} "
                             "choose which layers go, but no layer is removed: set layers (e.g. layers=0.2) "
                             "or a budget with layers in budget_prunes")
        if self.layer_selection == "block" and self.layer_importance == "weights":
            raise ValueError("layer_selection='block' needs a measured layer_importance: angular or kl")
        if (self.budget is None and self.heads == 0 and self.ffn == 0 and self.layers == 0
                and self.sparsity == 0 and self.pattern is None):
            raise ValueError("nothing to prune: set heads, ffn, layers, budget, sparsity or pattern "
                             "(for example heads=0.25, ffn=0.25)")
        return self

    def structured(self) -> bool:
        return self.budget is not None or self.heads > 0 or self.ffn > 0 or self.layers > 0

    def measures_layers(self) -> bool:
        return self.layer_importance != "weights"


@dataclass
class _Outcome:
    report: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@register
class PrunePass(Pass):
    """Structured (heads, FFN channels, layers), unstructured and 2:4 pruning of a transformer."""

    name = "prune"
    config_class = PruneConfig
    accepts = (TorchModel,)
    returns = TorchModel
    description = "prune heads, FFN channels, layers (torch-pruning DepGraph), unstructured or 2:4 sparsity"
    uses = frozenset({"data"})
    config: PruneConfig

    def apply(self, artifact: TorchModel, ctx: Context) -> TorchModel:
        cfg = self.config
        spec = arch_spec(artifact.module)
        module = copy.deepcopy(artifact.module)
        module.eval()
        feeds = _example_inputs(artifact, cfg.seed)
        with torch.no_grad():
            expected = _first_output(module(**feeds)).shape
        heads_before, ffn_before = layer_sizes(module, spec)
        before = {"params": count_params(module), "macs": count_macs(module)}
        outcome = _Outcome()
        depth = None
        if cfg.measures_layers():
            depth = measure_depth(artifact, spec, ctx.corpus(cfg.layer_texts), criterion=cfg.layer_importance,
                                  selection=cfg.layer_selection, max_length=cfg.max_length)
            outcome.report.update(depth.report)
        if cfg.importance == "taylor":
            outcome.report.update(taylor_scores(module, artifact, ctx.texts or [], cfg))
        to_prunable(module, spec)
        try:
            plan = self._plan(module, spec, before, outcome, depth)
            log.info("pruning %s: layers kept %s, heads removed %s, ffn kept %s (%s importance, %s)", spec.name,
                     plan.keep_layers, plan.heads_removed, plan.ffn_kept, cfg.importance, cfg.allocation)
            drop_layers(module, spec, plan.keep_layers)
            prune_widths(module, spec, plan, cfg, feeds)
            if cfg.sparsity > 0 or cfg.pattern:
                outcome.report.update(apply_sparsity(module, spec, cfg))
        finally:
            from_prunable(module, spec)
        module.zero_grad(set_to_none=True)
        _verify_forward(module, feeds, expected)
        structure = describe_structure(module, spec)
        out = artifact.derive(module=module, structure=structure)
        self._report(artifact, out, spec, ctx, before, heads_before, ffn_before, plan, outcome)
        return out

    def _plan(self, module: nn.Module, spec: ArchSpec, before: dict[str, int], outcome: _Outcome,
              depth: DepthScores | None) -> Plan:
        cfg = self.config
        parts = layer_parts(module, spec)
        scores = compute_scores(parts, spec, cfg.importance, cfg.seed)
        if depth is not None:
            scores.layers, scores.blocks = depth.layers, depth.blocks
        if cfg.budget:
            plan, found = search_budget(parts, spec, scores, cfg, before)
            outcome.report.update(found)
            return plan
        return make_plan(parts, spec, scores, cfg, {"heads": cfg.heads, "ffn": cfg.ffn, "layers": cfg.layers},
                         strict=True)

    def _report(self, parent: TorchModel, out: TorchModel, spec: ArchSpec, ctx: Context, before: dict[str, int],
                heads_before: list[int], ffn_before: list[int], plan: Plan, outcome: _Outcome) -> None:
        cfg = self.config
        heads_after, ffn_after = layer_sizes(out.module, spec)
        after = {"params": count_params(out.module), "macs": count_macs(out.module)}
        report = {
            "architecture": spec.name,
            "params_before": before["params"], "params_after": after["params"],
            "macs_before": before["macs"], "macs_after": after["macs"],
            "macs_counted_for": f"one sequence of {MACS_SEQ} tokens (Linear layers + attention matmuls)",
            "layers_before": len(heads_before), "layers_after": len(heads_after),
            "layers_kept": plan.keep_layers,
            "heads_before": heads_before, "heads_after": heads_after,
            "ffn_before": ffn_before, "ffn_after": ffn_after,
            "reloadable_with_transformers": not out.structure,
            **outcome.report,
        }
        if cfg.sparsity > 0 or cfg.pattern:
            sparsity = sparsity_report(out.module, spec)
            report.update(sparsity)
            if cfg.pattern == "2:4" and not sparsity["pattern_2_4"]:
                skipped = report.get("sparsity_skipped", [])
                outcome.warnings.append(f"2:4 pattern not met everywhere (in_features not a multiple of 4: {skipped})")
            outcome.warnings.append("sparse weights are stored dense: they make neither the file nor dense kernels "
                                    "smaller or faster; a runtime with sparse kernels is needed for that")
        if parent.task == "text-generation":
            report.update(lm_fidelity_report(parent, out))
        else:
            texts = ctx.corpus(FIDELITY_TEXTS)
            report["fidelity_cosine"] = fidelity(parent, out, texts, cfg.max_length)
            report["fidelity_texts"] = len(texts)
        if cfg.check_latency:
            timing = latency_check(parent.module, out.module, _latency_feeds(parent))
            report.update(timing)
            if timing["latency_verdict"] == "slower":
                outcome.warnings.append(f"the pruned model is slower than its parent in torch "
                                        f"({timing['latency_ms_after']} ms vs {timing['latency_ms_before']} ms, "
                                        f"speedup {timing['latency_speedup']}, CI {timing['latency_speedup_ci']})")
        for message in outcome.warnings:
            log.warning("prune: %s", message)
        report["warnings"] = outcome.warnings
        ctx.report.update(report)
        log.info("pruned: %d → %d parameters, %d → %d MACs, heads %s → %s, ffn %s → %s", before["params"],
                 after["params"], before["macs"], after["macs"], heads_before, heads_after, ffn_before, ffn_after)


__all__ = ["ARCHITECTURES", "ArchSpec", "LayerParts", "Plan", "PruneConfig", "PrunePass", "arch_spec", "count_macs",
           "count_params", "describe_structure", "is_2_4", "layer_costs", "layer_parts", "layer_sizes",
           "parse_budget", "sparsity_report", "supported_architectures"]
