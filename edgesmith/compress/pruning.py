"""Structured pruning of attention heads and FFN channels with torch-pruning's DepGraph.

What a transformer layer looks like to the pass (where its layers are, the names of q/k/v, the
attention output, the FFN input and output, and the attributes that hold the head count) is
declared once per architecture in an :class:`ArchSpec`; the pruning itself is architecture-free.

Hidden size is kept: every Linear that is not a q/k/v projection or an FFN input is given to
torch-pruning as an ignored layer, so only whole heads (q/k/v outputs and the attention-output
inputs) and FFN channels (FFN-input outputs and FFN-output inputs) are removed.

Two traps of torch-pruning 1.6 this module avoids:

- heads are silently not removed when the attention group's channel ratio is 0: the attention
  q/k/v get a channel ratio > 0 in ``pruning_ratio_dict`` whenever heads are pruned (with
  ``prune_head_dims=False`` that ratio removes no head dimension, it only lets head removal run);
- the head count attributes of the attention modules are not updated by torch-pruning: they are
  set here afterwards, from the pruned q projection and the unchanged head size.

A stock config can say an FFN size (``intermediate_size``) but not a head count that differs from
``hidden_size / head_dim``: head-pruned models carry a ``structure`` (module path → attribute
values) that :func:`edgesmith.structure.build_with_structure` uses to rebuild them.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from edgesmith.artifacts import TorchModel
from edgesmith.compress.base import Context, Pass, PassConfig, register
from edgesmith.errors import BadInput, EdgesmithError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class PruneConfig(PassConfig):
    """Fractions of attention heads and FFN channels to remove from every layer."""

    heads: float = 0.0
    ffn: float = 0.0
    importance: Literal["l1", "l2", "random"] = "l2"
    round_to: int = 8
    seed: int = 0

    @field_validator("heads", "ffn")
    @classmethod
    def _ratio_in_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError("a pruning ratio must be at least 0 and below 1 (0.25 removes a quarter)")
        return value

    @field_validator("round_to")
    @classmethod
    def _round_to_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("round_to must be 1 or more (1 disables rounding)")
        return value

    @model_validator(mode="after")
    def _something_to_prune(self) -> PruneConfig:
        if self.heads == 0.0 and self.ffn == 0.0:
            raise ValueError("nothing to prune: set heads and/or ffn above 0 (for example heads=0.25, ffn=0.25)")
        return self


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable parts of one architecture are. Paths are dotted attribute paths.

    ``layers`` is relative to the base model (``model.base_model``); the others are relative to
    one layer. ``heads_attr`` / ``all_head_attr`` are attributes of the ``attention`` module
    (``all_head_attr`` is None where the module has none); ``head_dim_attr`` holds the head size,
    which pruning keeps. ``config_heads`` / ``config_ffn`` name the config fields.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    query: str
    key: str
    value: str
    attention_out: str
    ffn_in: str
    ffn_out: str
    heads_attr: str
    head_dim_attr: str
    all_head_attr: str | None
    config_heads: str
    config_ffn: str


_BERT_LIKE = dict(
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    heads_attr="num_attention_heads",
    head_dim_attr="attention_head_size",
    all_head_attr="all_head_size",
    config_heads="num_attention_heads",
    config_ffn="intermediate_size",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(name="BERT", model_types=("bert",), **_BERT_LIKE),
    ArchSpec(name="RoBERTa", model_types=("roberta",), **_BERT_LIKE),
    ArchSpec(
        name="DistilBERT",
        model_types=("distilbert",),
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        heads_attr="n_heads",
        head_dim_attr="attention_head_size",
        all_head_attr=None,
        config_heads="n_heads",
        config_ffn="hidden_dim",
    ),
)


def supported_architectures() -> list[str]:
    return [spec.name for spec in ARCHITECTURES]


def arch_spec(module: nn.Module) -> ArchSpec:
    """The description of ``module``'s architecture, or BadInput naming the supported ones."""
    config = getattr(module, "config", None)
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    what = f"{type(module).__name__} (model_type {model_type!r})" if model_type else type(module).__name__
    raise BadInput(
        f"prune does not support {what}; supported architectures: {', '.join(supported_architectures())} "
        "(Hugging Face models of these families)"
    )


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class LayerParts:
    """The modules of one transformer layer that pruning touches."""

    attention: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_out: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear


def layer_parts(module: nn.Module, spec: ArchSpec) -> list[LayerParts]:
    base = getattr(module, "base_model", module)
    try:
        layers = _get(base, spec.layers)
        parts = [LayerParts(*(_get(layer, p) for p in (spec.attention, spec.query, spec.key, spec.value,
                                                       spec.attention_out, spec.ffn_in, spec.ffn_out)))
                 for layer in layers]
    except AttributeError as exc:
        raise BadInput(f"{type(module).__name__} does not have the layout of a {spec.name} model ({exc})") from exc
    for part in parts:
        if not hasattr(part.attention, spec.heads_attr):
            raise BadInput(f"{type(part.attention).__name__} has no '{spec.heads_attr}': "
                           f"not the {spec.name} attention this pass knows")
    return parts


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "random":
        return tp.importance.RandomImportance()
    return tp.importance.MagnitudeImportance(p=1 if kind == "l1" else 2)


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


def _check_sizes(parts: list[LayerParts], spec: ArchSpec, config: PruneConfig) -> None:
    """Refuse ratios that would leave a layer without heads or FFN channels."""
    for i, part in enumerate(parts):
        heads = int(getattr(part.attention, spec.heads_attr))
        if config.heads > 0 and heads - math.ceil(config.heads * heads) < 1:
            raise BadInput(f"prune: heads={config.heads} would remove all {heads} heads of layer {i}; use a smaller ratio")
        width = part.ffn_in.out_features
        kept = int(width * (1 - config.ffn))
        if config.ffn > 0 and kept - kept % config.round_to < 1:
            raise BadInput(f"prune: ffn={config.ffn} with round_to={config.round_to} would remove all {width} FFN "
                           f"channels of layer {i}; use a smaller ratio or round_to")


def prune_module(module: nn.Module, spec: ArchSpec, config: PruneConfig,
                 example_inputs: dict[str, torch.Tensor]) -> None:
    """Prune ``module`` in place with torch-pruning and fix the attention attributes."""
    import torch_pruning as tp

    parts = layer_parts(module, spec)
    _check_sizes(parts, spec, config)
    prunable: set[nn.Module] = set()
    ratios: dict[Any, float] = {}
    num_heads: dict[nn.Module, int] = {}
    for part in parts:
        qkv = (part.query, part.key, part.value)
        for linear in qkv:
            num_heads[linear] = int(getattr(part.attention, spec.heads_attr))
        if config.heads > 0:
            prunable.update(qkv)
            # > 0 so that head removal runs at all; prune_head_dims=False keeps every head dimension
            ratios[qkv] = 0.5
        if config.ffn > 0:
            prunable.add(part.ffn_in)
            ratios[part.ffn_in] = config.ffn
    ignored = [m for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Embedding)) and m not in prunable]
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        pruner = tp.pruner.BasePruner(
            module,
            example_inputs,
            importance=_importance(config.importance),
            global_pruning=False,
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=ignored,
            round_to=config.round_to,
            num_heads=num_heads,
            prune_num_heads=config.heads > 0,
            prune_head_dims=False,
            head_pruning_ratio=config.heads,
            output_transform=lambda out: _first_output(out).sum(),
        )
        pruner.step()
    for part in parts:
        head_dim = int(getattr(part.attention, spec.head_dim_attr))
        heads = part.query.out_features // head_dim
        setattr(part.attention, spec.heads_attr, heads)
        if spec.all_head_attr:
            setattr(part.attention, spec.all_head_attr, heads * head_dim)


def layer_sizes(module: nn.Module, spec: ArchSpec) -> tuple[list[int], list[int]]:
    """Heads and FFN width of every layer."""
    parts = layer_parts(module, spec)
    return ([int(getattr(p.attention, spec.heads_attr)) for p in parts],
            [p.ffn_in.out_features for p in parts])


def describe_structure(module: nn.Module, spec: ArchSpec) -> dict[str, dict[str, Any]]:
    """Update the config where it can say the new shapes; return what it cannot say.

    FFN widths that are equal in every layer go to the config's FFN size. Head counts differ from
    what the config implies (hidden size / head count gives the head size), so each pruned
    attention module's head attributes are recorded by module path; so are unequal FFN widths.
    """
    config = module.config
    names = {id(m): name for name, m in module.named_modules()}
    parts = layer_parts(module, spec)
    config_heads = int(getattr(config, spec.config_heads))
    structure: dict[str, dict[str, Any]] = {}
    for part in parts:
        heads = int(getattr(part.attention, spec.heads_attr))
        if heads != config_heads:
            values: dict[str, Any] = {spec.heads_attr: heads}
            if spec.all_head_attr:
                values[spec.all_head_attr] = int(getattr(part.attention, spec.all_head_attr))
            structure[names[id(part.attention)]] = values
    widths = {p.ffn_in.out_features for p in parts}
    if len(widths) == 1:
        setattr(config, spec.config_ffn, widths.pop())
    else:
        for part in parts:
            structure[names[id(part.ffn_in)]] = {"out_features": part.ffn_in.out_features}
            structure[names[id(part.ffn_out)]] = {"in_features": part.ffn_out.in_features}
    return structure


def _verify_forward(module: nn.Module, feeds: dict[str, torch.Tensor], expected: torch.Size) -> None:
    try:
        with torch.no_grad():
            out = _first_output(module(**feeds))
    except Exception as exc:
        raise EdgesmithError(f"prune: the pruned model does not run ({type(exc).__name__}: {exc})") from exc
    if out.shape != expected or not torch.isfinite(out).all():
        raise EdgesmithError(f"prune: the pruned model's output has shape {tuple(out.shape)} "
                             f"(expected {tuple(expected)}) or non-finite values")


@register
class PrunePass(Pass):
    """Remove whole attention heads and FFN channels from every layer (torch-pruning DepGraph)."""

    name = "prune"
    config_class = PruneConfig
    accepts = (TorchModel,)
    returns = TorchModel
    description = "structured pruning of attention heads and FFN channels (torch-pruning DepGraph)"
    config: PruneConfig

    def apply(self, artifact: TorchModel, ctx: Context) -> TorchModel:
        spec = arch_spec(artifact.module)
        module = copy.deepcopy(artifact.module)
        module.eval()
        feeds = _example_inputs(artifact, self.config.seed)
        with torch.no_grad():
            expected = _first_output(module(**feeds)).shape
        heads_before, ffn_before = layer_sizes(module, spec)
        params_before = sum(p.numel() for p in module.parameters())
        log.info("pruning %s: heads %.2f, ffn %.2f (%s importance)", spec.name, self.config.heads,
                 self.config.ffn, self.config.importance)
        prune_module(module, spec, self.config, feeds)
        _verify_forward(module, feeds, expected)
        structure = describe_structure(module, spec)
        heads_after, ffn_after = layer_sizes(module, spec)
        params_after = sum(p.numel() for p in module.parameters())
        ctx.report.update({
            "architecture": spec.name,
            "params_before": params_before,
            "params_after": params_after,
            "heads_before": heads_before,
            "heads_after": heads_after,
            "ffn_before": ffn_before,
            "ffn_after": ffn_after,
            "reloadable_with_transformers": not structure,
        })
        log.info("pruned: %d → %d parameters, heads %s → %s, ffn %s → %s", params_before, params_after,
                 heads_before, heads_after, ffn_before, ffn_after)
        return artifact.derive(module=module, structure=structure)
