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
4. Depth: the layers of lowest importance are removed; the config's layer count and each layer's
   ``layer_idx`` are updated (a KV cache indexes layers by it).
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
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from edgesmith.artifacts import TorchModel
from edgesmith.compress.base import Context, Pass, PassConfig, register
from edgesmith.errors import BadInput, EdgesmithError

log = logging.getLogger(__name__)

#: tokens of the sequence the MACs are counted for
MACS_SEQ = 128
#: interleaved rounds × iterations per round of the quick torch latency check (batch 1)
LATENCY_ROUNDS = 5
LATENCY_ITERATIONS = 4
#: texts the pass measures fidelity (cosine of mean-pooled outputs) on
FIDELITY_TEXTS = 64

Component = Literal["heads", "ffn", "layers"]
_BUDGET = re.compile(r"^\s*(params|macs)\s*=\s*([0-9.]+)\s*$")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class PruneConfig(PassConfig):
    """What to remove and how to choose it.

    Ratios: ``heads`` (query heads per layer), ``ffn`` (FFN channels per layer), ``layers`` (whole
    layers). ``budget`` (``"params=0.5"`` / ``"macs=0.5"``: keep at most that fraction) replaces
    the ratios of the components in ``budget_prunes`` by one searched ratio. ``sparsity`` zeros a
    fraction of the weights of the layers' Linears; ``pattern="2:4"`` zeros two of every four.
    ``importance``: l1 / l2 weight magnitude, first-order ``taylor`` (needs data), ``random``.
    ``allocation``: ``uniform`` (same ratio in every layer) or ``global`` (ranked across layers).
    """

    heads: float = 0.0
    ffn: float = 0.0
    layers: float = 0.0
    importance: Literal["l1", "l2", "taylor", "random"] = "l2"
    allocation: Literal["uniform", "global"] = "uniform"
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

    @field_validator("round_to", "taylor_batches", "taylor_batch_size", "max_length")
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
        if (self.budget is None and self.heads == 0 and self.ffn == 0 and self.layers == 0
                and self.sparsity == 0 and self.pattern is None):
            raise ValueError("nothing to prune: set heads, ffn, layers, budget, sparsity or pattern "
                             "(for example heads=0.25, ffn=0.25)")
        return self

    def structured(self) -> bool:
        return self.budget is not None or self.heads > 0 or self.ffn > 0 or self.layers > 0


def parse_budget(text: str) -> tuple[str, float]:
    """``"params=0.5"`` → ``("params", 0.5)``; BadInput-worthy ValueError otherwise."""
    match = _BUDGET.match(text)
    if not match:
        raise ValueError(f"budget {text!r} is not 'params=F' or 'macs=F' (F the fraction kept, e.g. params=0.6)")
    fraction = float(match.group(2))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"budget fraction must be between 0 and 1 (the fraction kept), got {fraction}")
    return match.group(1), fraction


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable parts of one architecture are. Paths are dotted attribute paths.

    ``layers`` is relative to the base model (``model.base_model``); the others to one layer.
    ``qkv`` holds the q, k, v projections (one path when they are fused, as GPT-2's ``c_attn``);
    ``ffn_in`` the FFN input projection(s) (Llama: gate and up). On the ``attention`` module:
    ``heads_attr`` the head count (None where the module has none: Llama), ``head_dim_attr`` the
    head size (kept), ``all_head_attr`` heads × head size, ``kv_groups_attr`` query heads per KV
    head. Config fields: ``config_heads``, ``config_kv_heads``, ``config_head_dim`` (a field
    stock configs read, so pruned heads are expressible), ``config_ffn``, ``config_layers``.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    qkv: tuple[str, ...]
    attention_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    head_dim_attr: str
    heads_attr: str | None
    all_head_attr: str | None
    kv_groups_attr: str | None
    config_heads: str
    config_kv_heads: str | None
    config_head_dim: str | None
    config_ffn: str
    config_layers: str

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv) == 1


_BERT_LIKE = dict(
    layers="encoder.layer", attention="attention.self",
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
    head_dim_attr="attention_head_size", heads_attr="num_attention_heads", all_head_attr="all_head_size",
    kv_groups_attr=None, config_heads="num_attention_heads", config_kv_heads=None, config_head_dim=None,
    config_ffn="intermediate_size", config_layers="num_hidden_layers",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(name="BERT", model_types=("bert",), **_BERT_LIKE),
    ArchSpec(name="RoBERTa", model_types=("roberta",), **_BERT_LIKE),
    ArchSpec(
        name="DistilBERT", model_types=("distilbert",), layers="transformer.layer", attention="attention",
        qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"), attention_out="attention.out_lin",
        ffn_in=("ffn.lin1",), ffn_out="ffn.lin2", head_dim_attr="attention_head_size", heads_attr="n_heads",
        all_head_attr=None, kv_groups_attr=None, config_heads="n_heads", config_kv_heads=None,
        config_head_dim=None, config_ffn="hidden_dim", config_layers="n_layers",
    ),
    ArchSpec(
        name="GPT-2", model_types=("gpt2",), layers="h", attention="attn", qkv=("attn.c_attn",),
        attention_out="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj", head_dim_attr="head_dim",
        heads_attr="num_heads", all_head_attr="split_size", kv_groups_attr=None, config_heads="n_head",
        config_kv_heads=None, config_head_dim=None, config_ffn="n_inner", config_layers="n_layer",
    ),
    ArchSpec(
        name="Llama", model_types=("llama",), layers="layers", attention="self_attn",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attention_out="self_attn.o_proj",
        ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", head_dim_attr="head_dim",
        heads_attr=None, all_head_attr=None, kv_groups_attr="num_key_value_groups",
        config_heads="num_attention_heads", config_kv_heads="num_key_value_heads", config_head_dim="head_dim",
        config_ffn="intermediate_size", config_layers="num_hidden_layers",
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


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def out_features(module: nn.Module) -> int:
    return int(module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0])


def in_features(module: nn.Module) -> int:
    return int(module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1])


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whatever the module stores."""
    return module.weight.t() if is_conv1d(module) else module.weight


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass
class LayerParts:
    """The modules of one transformer layer that pruning touches."""

    layer: nn.Module
    attention: nn.Module
    qkv: list[nn.Module]
    attention_out: nn.Module
    ffn_in: list[nn.Module]
    ffn_out: nn.Module


def layers_of(module: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    base = getattr(module, "base_model", module)
    try:
        return _get(base, spec.layers)
    except AttributeError as exc:
        raise BadInput(f"{type(module).__name__} does not have the layout of a {spec.name} model ({exc})") from exc


def layer_parts(module: nn.Module, spec: ArchSpec) -> list[LayerParts]:
    """The parts of every layer (GPT-2 in its prunable form: the split q/k/v Linears)."""
    parts = []
    try:
        for layer in layers_of(module, spec):
            attention = _get(layer, spec.attention)
            if spec.fused_qkv and hasattr(attention, "es_query"):
                qkv = [attention.es_query, attention.es_key, attention.es_value]
            else:
                qkv = [_get(layer, p) for p in spec.qkv]
            parts.append(LayerParts(layer, attention, qkv, _get(layer, spec.attention_out),
                                    [_get(layer, p) for p in spec.ffn_in], _get(layer, spec.ffn_out)))
    except AttributeError as exc:
        raise BadInput(f"{type(module).__name__} does not have the layout of a {spec.name} model ({exc})") from exc
    for part in parts:
        if not hasattr(part.attention, spec.head_dim_attr):
            raise BadInput(f"{type(part.attention).__name__} has no '{spec.head_dim_attr}': "
                           f"not the {spec.name} attention this pass knows")
    return parts


def head_dim_of(part: LayerParts, spec: ArchSpec) -> int:
    return int(getattr(part.attention, spec.head_dim_attr))


def heads_of(part: LayerParts, spec: ArchSpec) -> int:
    """Query heads of a layer."""
    if spec.heads_attr:
        return int(getattr(part.attention, spec.heads_attr))
    return out_features(part.qkv[0]) // head_dim_of(part, spec)


def kv_heads_of(part: LayerParts, spec: ArchSpec) -> int:
    if spec.kv_groups_attr and len(part.qkv) == 3:
        return out_features(part.qkv[1]) // head_dim_of(part, spec)
    return heads_of(part, spec)


def ffn_width_of(part: LayerParts) -> int:
    return out_features(part.ffn_in[0])


def layer_sizes(module: nn.Module, spec: ArchSpec) -> tuple[list[int], list[int]]:
    """Query heads and FFN width of every layer."""
    parts = layer_parts(module, spec)
    return [heads_of(p, spec) for p in parts], [ffn_width_of(p) for p in parts]


# ---------------------------------------------------------------------------------------------
# Cost model: parameters and MACs
# ---------------------------------------------------------------------------------------------


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_macs(module: nn.Module, tokens: int) -> int:
    return sum(tokens * in_features(m) * out_features(m) for m in module.modules() if is_linear(m))


def count_macs(module: nn.Module, seq: int = MACS_SEQ) -> int:
    """MACs of one sequence of ``seq`` tokens (see the module docstring for what counts)."""
    total = _linear_macs(module, seq)
    try:
        spec = arch_spec(module)
    except BadInput:
        return total
    for part in layer_parts(module, spec):
        total += 2 * seq * seq * heads_of(part, spec) * head_dim_of(part, spec)
    return total


@dataclass
class LayerCost:
    """A layer's parameters/MACs and what one query head or one FFN channel of it costs."""

    params: int
    macs: int
    head_params: float
    head_macs: float
    channel_params: float
    channel_macs: float


def _params_of(modules: Sequence[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters(recurse=False))


def layer_costs(parts: list[LayerParts], spec: ArchSpec, seq: int = MACS_SEQ) -> list[LayerCost]:
    """Per-layer costs for the budget search. A query head carries its q rows and attention-out
    columns (and, without grouped-query attention, its k and v rows) and its share of the two
    attention matmuls; an FFN channel its rows of the FFN input(s) and column of the FFN output."""
    costs = []
    for part in parts:
        heads, kv_heads, dim = heads_of(part, spec), kv_heads_of(part, spec), head_dim_of(part, spec)
        width = ffn_width_of(part)
        per_head = part.qkv if kv_heads == heads else part.qkv[:1]
        head_weights = sum(in_features(m) * out_features(m) for m in per_head)
        head_params = (_params_of(per_head) + in_features(part.attention_out) * out_features(part.attention_out)) / heads
        head_macs = seq * (head_weights + in_features(part.attention_out) * out_features(part.attention_out)) / heads
        head_macs += 2 * seq * seq * dim
        ffn_weights = sum(in_features(m) * out_features(m) for m in part.ffn_in)
        out_weight = in_features(part.ffn_out) * out_features(part.ffn_out)
        channel_params = (_params_of(part.ffn_in) + out_weight) / width
        channel_macs = seq * (ffn_weights + out_weight) / width
        macs = _linear_macs(part.layer, seq) + 2 * seq * seq * heads * dim
        costs.append(LayerCost(count_params(part.layer), macs, head_params, head_macs, channel_params, channel_macs))
    return costs


# ---------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------


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
    weights = mask.unsqueeze(-1).to(output.dtype)
    return (output * weights).sum(1) / weights.sum(1).clamp(min=1)


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


# ---------------------------------------------------------------------------------------------
# GPT-2: the prunable form (Conv1D → Linear, c_attn split into q/k/v)
# ---------------------------------------------------------------------------------------------


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    linear = nn.Linear(in_features(conv), out_features(conv), bias=conv.bias is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    if conv.weight.grad is not None:
        linear.weight.grad = conv.weight.grad.t().contiguous()
    return linear


def _conv1d_from_linears(linears: Sequence[nn.Linear]) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    weight = torch.cat([lin.weight.detach().t() for lin in linears], dim=1)
    conv = Conv1D(weight.shape[1], weight.shape[0]).to(weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(torch.cat([lin.bias.detach() for lin in linears]))
    return conv


def _split_linear(linear: nn.Linear, parts: int) -> list[nn.Linear]:
    size = linear.out_features // parts
    out = []
    for i in range(parts):
        piece = nn.Linear(linear.in_features, size, bias=True, dtype=linear.weight.dtype)
        rows = slice(i * size, (i + 1) * size)
        with torch.no_grad():
            piece.weight.copy_(linear.weight[rows])
            piece.bias.copy_(linear.bias[rows])
        if linear.weight.grad is not None:
            piece.weight.grad = linear.weight.grad[rows].clone()
        out.append(piece)
    return out


def _gpt2_split_forward(self, hidden_states, *args, **kwargs):
    """GPT-2 attention on split q/k/v Linears: traced by torch-pruning only (heads as (heads, head_dim))."""
    batch, seq, _ = hidden_states.shape
    q, k, v = (lin(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
               for lin in (self.es_query, self.es_key, self.es_value))
    weights = torch.softmax(q @ k.transpose(-1, -2) * self.scaling, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, seq, -1)
    return self.c_proj(out), None


def to_prunable(module: nn.Module, spec: ArchSpec) -> None:
    """GPT-2: Conv1D → Linear everywhere in the layers, c_attn split into q/k/v (gradients kept)."""
    if spec.name != "GPT-2":
        return
    for layer in layers_of(module, spec):
        attn = layer.attn
        if hasattr(attn, "q_attn"):
            raise BadInput("prune: GPT-2 with cross-attention is not supported")
        fused = _linear_from_conv1d(attn.c_attn)
        attn.es_query, attn.es_key, attn.es_value = _split_linear(fused, 3)
        del attn.c_attn
        attn.c_proj = _linear_from_conv1d(attn.c_proj)
        layer.mlp.c_fc = _linear_from_conv1d(layer.mlp.c_fc)
        layer.mlp.c_proj = _linear_from_conv1d(layer.mlp.c_proj)
        attn.forward = types.MethodType(_gpt2_split_forward, attn)


def from_prunable(module: nn.Module, spec: ArchSpec) -> None:
    """Undo :func:`to_prunable`: fuse q/k/v into c_attn, Linear → Conv1D, the stock forward back."""
    if spec.name != "GPT-2":
        return
    for layer in layers_of(module, spec):
        attn = layer.attn
        attn.c_attn = _conv1d_from_linears([attn.es_query, attn.es_key, attn.es_value])
        width = attn.es_query.out_features
        del attn.es_query, attn.es_key, attn.es_value
        del attn.forward
        attn.c_proj = _conv1d_from_linears([attn.c_proj])
        layer.mlp.c_fc = _conv1d_from_linears([layer.mlp.c_fc])
        layer.mlp.c_proj = _conv1d_from_linears([layer.mlp.c_proj])
        attn.split_size = width
        attn.num_heads = width // attn.head_dim


# ---------------------------------------------------------------------------------------------
# The plan: layers, heads and FFN channels each layer keeps
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Which layers stay (indices into the original layers), and for each of them the query heads
    removed and the FFN width kept."""

    keep_layers: list[int]
    heads_removed: list[int]
    ffn_kept: list[int]


@dataclass
class Scores:
    """Importance of each layer, of each query head and of each FFN channel (per layer)."""

    layers: list[float]
    heads: list[torch.Tensor]
    channels: list[torch.Tensor]


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


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------


def drop_layers(module: nn.Module, spec: ArchSpec, keep: list[int]) -> None:
    """Keep only the layers ``keep``; renumber ``layer_idx`` and update the config's layer count."""
    layers = layers_of(module, spec)
    if len(keep) == len(layers):
        return
    base = getattr(module, "base_model", module)
    parent_path, _, name = spec.layers.rpartition(".")
    parent = _get(base, parent_path) if parent_path else base
    setattr(parent, name, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(layers_of(module, spec)):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx") and isinstance(sub.layer_idx, int):
                sub.layer_idx = new_index
    config = module.config
    setattr(config, spec.config_layers, len(keep))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [layer_types[i] for i in keep]


# ---------------------------------------------------------------------------------------------
# Width (torch-pruning)
# ---------------------------------------------------------------------------------------------


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


def prune_widths(module: nn.Module, spec: ArchSpec, plan: Plan, config: PruneConfig,
                 example_inputs: dict[str, torch.Tensor]) -> None:
    """Prune heads and FFN channels of the (already depth-pruned) layers to the plan's sizes."""
    import torch_pruning as tp

    parts = layer_parts(module, spec)
    prunable: set[nn.Module] = set()
    ratios: dict[Any, float] = {}
    head_ratios: dict[nn.Module, float] = {}
    num_heads: dict[nn.Module, int] = {}
    for part, removed, kept in zip(parts, plan.heads_removed, plan.ffn_kept):
        heads, kv_heads = heads_of(part, spec), kv_heads_of(part, spec)
        for linear, count in zip(part.qkv, (heads, kv_heads, kv_heads)):
            num_heads[linear] = count
        if removed > 0:
            prunable.update(part.qkv)
            ratios[tuple(part.qkv)] = 0.5  # > 0 so head removal runs; prune_head_dims=False keeps dims
            for linear in part.qkv:
                head_ratios[linear] = (removed - 0.5) / heads  # torch-pruning takes ceil(ratio * heads)
        width = ffn_width_of(part)
        if kept < width:
            prunable.update(part.ffn_in)
            key = part.ffn_in[0] if len(part.ffn_in) == 1 else tuple(part.ffn_in)
            ratios[key] = (width - kept) / width - 1e-9  # it keeps int(width * (1 - ratio))
    if not prunable:
        return
    ignored: list[Any] = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and m not in prunable]
    # parameters of modules torch-pruning does not know (Llama's RMSNorm): left out of the graph,
    # else each becomes the root of a group spanning the hidden size of the whole model (very slow)
    ignored += [p for m in module.modules() if not isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm))
                for p in m.parameters(recurse=False)]
    use_cache = getattr(module.config, "use_cache", None)
    if use_cache:
        module.config.use_cache = False  # a KV cache in the traced graph makes torch-pruning's grouping hang
    with torch.enable_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        torch.manual_seed(config.seed)
        pruner = tp.pruner.BasePruner(
            module, example_inputs, importance=_tp_importance(config.importance), global_pruning=False,
            pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=ignored, round_to=config.round_to,
            num_heads=dict(num_heads), prune_num_heads=bool(head_ratios), prune_head_dims=False,
            head_pruning_ratio=0.0, head_pruning_ratio_dict=head_ratios or None,
            output_transform=lambda out: _first_output(out).sum(),
        )
        pruner.step()
    if use_cache:
        module.config.use_cache = use_cache
    for part, removed, kept, heads_before in zip(parts, plan.heads_removed, plan.ffn_kept,
                                                 [num_heads[p.qkv[0]] for p in parts]):
        dim = head_dim_of(part, spec)
        heads = out_features(part.qkv[0]) // dim
        if spec.heads_attr:
            setattr(part.attention, spec.heads_attr, heads)
        if spec.all_head_attr:
            setattr(part.attention, spec.all_head_attr, heads * dim)
        if spec.kv_groups_attr:
            setattr(part.attention, spec.kv_groups_attr, heads // kv_heads_of(part, spec))
        if heads != heads_before - removed or ffn_width_of(part) != kept:
            raise EdgesmithError(f"prune: torch-pruning left {heads} heads / {ffn_width_of(part)} FFN channels "
                                 f"where the plan says {heads_before - removed} / {kept}")


# ---------------------------------------------------------------------------------------------
# Sparsity (unstructured and 2:4)
# ---------------------------------------------------------------------------------------------


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


def is_2_4(weight_out_in: torch.Tensor) -> bool:
    """True when every four consecutive weights along the input dimension hold at least two zeros."""
    out, inp = weight_out_in.shape
    if inp % 4:
        return False
    return bool(((weight_out_in.reshape(out, -1, 4) == 0).sum(-1) >= 2).all())


def sparsity_report(module: nn.Module, spec: ArchSpec) -> dict[str, Any]:
    """Achieved sparsity per module and per layer of the layers' Linear weights, and whether all of
    them follow the 2:4 pattern."""
    per_module: dict[str, float] = {}
    per_layer: list[float] = []
    all_2_4 = True
    names = {id(m): n for n, m in module.named_modules()}
    for layer in layers_of(module, spec):
        zeros = total = 0
        for m in layer.modules():
            if not is_linear(m):
                continue
            w = linear_weight(m).detach()
            z = int((w == 0).sum())
            per_module[names[id(m)]] = round(z / w.numel(), 4)
            zeros, total = zeros + z, total + w.numel()
            all_2_4 = all_2_4 and is_2_4(w)
        per_layer.append(round(zeros / total, 4) if total else 0.0)
    return {"sparsity_per_layer": per_layer, "sparsity_per_module": per_module, "pattern_2_4": all_2_4}


# ---------------------------------------------------------------------------------------------
# Config and structure after pruning
# ---------------------------------------------------------------------------------------------


def describe_structure(module: nn.Module, spec: ArchSpec) -> dict[str, dict[str, Any]]:
    """Update the config where it can say the new shapes; return what it cannot say.

    Equal FFN widths go to the config's FFN field; Llama's equal head counts to
    ``num_attention_heads`` with ``head_dim`` set explicitly. Otherwise each module whose shape
    or attributes differ from what the config builds is recorded by module path.
    """
    config = module.config
    names = {id(m): name for name, m in module.named_modules()}
    parts = layer_parts(module, spec)
    structure: dict[str, dict[str, Any]] = {}
    heads = [heads_of(p, spec) for p in parts]
    if spec.config_head_dim:
        setattr(config, spec.config_head_dim, head_dim_of(parts[0], spec))
        if len(set(heads)) == 1:
            setattr(config, spec.config_heads, heads[0])
    config_heads = int(getattr(config, spec.config_heads))
    for part, count in zip(parts, heads):
        if count == config_heads:
            continue
        values: dict[str, Any] = {}
        if spec.heads_attr:
            values[spec.heads_attr] = count
        if spec.all_head_attr:
            values[spec.all_head_attr] = int(getattr(part.attention, spec.all_head_attr))
        if spec.kv_groups_attr:
            values[spec.kv_groups_attr] = int(getattr(part.attention, spec.kv_groups_attr))
        structure[names[id(part.attention)]] = values
    widths = {ffn_width_of(p) for p in parts}
    if len(widths) == 1:
        setattr(config, spec.config_ffn, widths.pop())
    else:
        for part in parts:
            for m in part.ffn_in:
                structure[names[id(m)]] = {"nf": out_features(m)} if is_conv1d(m) else {"out_features": out_features(m)}
            if not is_conv1d(part.ffn_out):
                structure[names[id(part.ffn_out)]] = {"in_features": in_features(part.ffn_out)}
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 option: the scaling depends on the layer's original index, which depth pruning changed
        for part in parts:
            structure.setdefault(names[id(part.attention)], {})["scaling"] = float(part.attention.scaling)
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


# ---------------------------------------------------------------------------------------------
# Measurements: fidelity and a quick latency check
# ---------------------------------------------------------------------------------------------


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


def latency_check(parent: nn.Module, child: nn.Module, feeds: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Torch latency of both at batch 1: LATENCY_ROUNDS rounds of LATENCY_ITERATIONS timed runs
    each (after one warm-up run), the order of the two rotating every round; speedup with its
    bootstrap confidence interval (``edgesmith.profiling.bootstrap_speedup``)."""
    from edgesmith.profiling import bootstrap_speedup, verdict_of

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


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


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
        if cfg.importance == "taylor":
            outcome.report.update(taylor_scores(module, artifact, ctx.texts or [], cfg))
        to_prunable(module, spec)
        try:
            plan = self._plan(module, spec, before, outcome)
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

    def _plan(self, module: nn.Module, spec: ArchSpec, before: dict[str, int], outcome: _Outcome) -> Plan:
        cfg = self.config
        parts = layer_parts(module, spec)
        scores = compute_scores(parts, spec, cfg.importance, cfg.seed)
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

