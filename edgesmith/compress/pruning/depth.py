"""Measured layer importance for depth pruning, on real tokens of data.

- ``angular``: the angular distance ``arccos(cos(h_l, h_{l+n})) / π`` between the hidden state
  entering layer ``l`` and the one entering layer ``l + n`` (the last layer's output for
  ``l + n = L``), averaged over the real tokens of the data (Gromov et al., "The Unreasonable
  Ineffectiveness of the Deeper Layers"). A small distance means the block barely changes the
  residual stream. One forward pass with hooks gives the distance of every block.
- ``kl``: the KL divergence KL(model || model without the layer(s)) of the output distribution
  (next-token distributions of a causal LM at every real token; class distribution of a
  classifier), the layer or block skipped by hooks that hand its input through. One forward pass
  per candidate (L for single layers, L - n + 1 for blocks of n).

``individual`` selection removes the layers of lowest score one by one (each measured alone);
``block`` removes the contiguous run of ``n`` layers whose removal scores lowest. Both are
computed on the unmodified parent model, before any pruning step touches the copy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.architectures import ArchSpec, layers_of
from edgesmith.artifacts import TorchModel
from edgesmith.errors import BadInput

log = logging.getLogger(__name__)

#: rows per forward pass of the measurement
BATCH_SIZE = 16
#: keyword names under which layers of the supported architectures take their input hidden state
HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x")


def _hidden_arg(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args and torch.is_tensor(args[0]):
        return args[0]
    for name in HIDDEN_KWARGS:
        if torch.is_tensor(kwargs.get(name)):
            return kwargs[name]
    raise BadInput("prune: cannot find the hidden-state input of a layer to measure layer importance; "
                   "use layer_importance='weights'")


def _hidden_out(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class DepthData:
    """Tokenized measurement batches (right padding, so positions count from 0 in every row)."""

    batches: list[dict[str, torch.Tensor]]
    texts: int
    tokens: int


def measurement_batches(model: TorchModel, texts: list[str], max_length: int) -> DepthData:
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise BadInput(f"prune: a measured layer importance needs the tokenizer of {model.name} to read the data; "
                       "save one beside the model (tokenizer.save_pretrained)")
    texts = [t for t in texts if t and t.strip()]
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = "right"
    if getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batches, tokens = [], 0
    for start in range(0, len(texts), BATCH_SIZE):
        enc = tokenizer(texts[start:start + BATCH_SIZE], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        feeds = {name: enc[name] for name in model.input_names if name in enc}
        feeds.setdefault("attention_mask", torch.ones_like(feeds["input_ids"]))
        tokens += int(feeds["attention_mask"].sum())
        batches.append(feeds)
    if tokens < 2:
        raise BadInput("prune: a measured layer importance needs data with real text (got "
                       f"{len(texts)} non-empty texts); give --data FILE (CLI), a 'data:' section (recipe) "
                       "or Context(texts=[...]) (Python)")
    return DepthData(batches, len(texts), tokens)


class _Skip:
    """Hooks that make the given layers hand their input hidden state through unchanged."""

    def __init__(self, layers: nn.ModuleList, indices: range | list[int]):
        self.handles: list[Any] = []
        for i in indices:
            saved: dict[str, torch.Tensor] = {}

            def before(module, args, kwargs, saved=saved):
                saved["h"] = _hidden_arg(args, kwargs)

            def after(module, args, kwargs, output, saved=saved):
                h = saved.pop("h")
                return (h, *output[1:]) if isinstance(output, tuple) else h

            self.handles.append(layers[i].register_forward_pre_hook(before, with_kwargs=True))
            self.handles.append(layers[i].register_forward_hook(after, with_kwargs=True))

    def __enter__(self) -> _Skip:
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def _run(module: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    kwargs: dict[str, Any] = dict(batch)
    if getattr(getattr(module, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return module(**kwargs)


def angular_distances(module: nn.Module, spec: ArchSpec, data: DepthData) -> torch.Tensor:
    """``D[l, m]`` (0 ≤ l < m ≤ L): mean over real tokens of arccos(cos(h_l, h_m)) / π, where
    ``h_l`` is the hidden state entering layer l (``h_L`` the last layer's output)."""
    layers = layers_of(module, spec)
    count = len(layers)
    states: list[torch.Tensor | None] = [None] * (count + 1)
    handles = []
    for i, layer in enumerate(layers):
        def before(mod, args, kwargs, i=i):
            states[i] = _hidden_arg(args, kwargs).detach()

        handles.append(layer.register_forward_pre_hook(before, with_kwargs=True))

    def last(mod, args, output):
        states[count] = _hidden_out(output).detach()

    handles.append(layers[count - 1].register_forward_hook(last))
    sums = torch.zeros(count + 1, count + 1, dtype=torch.float64)
    tokens = 0
    try:
        with torch.no_grad():
            for batch in data.batches:
                _run(module, batch)
                mask = batch["attention_mask"].bool()
                flat = [F.normalize(s[mask].double(), dim=-1) for s in states]  # type: ignore[union-attr]
                for lo in range(count):
                    for hi in range(lo + 1, count + 1):
                        cos = (flat[lo] * flat[hi]).sum(-1).clamp(-1.0, 1.0)
                        sums[lo, hi] += float((torch.arccos(cos) / torch.pi).sum())
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return sums / max(tokens, 1)


def _output_logprobs(out: Any, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Log-probabilities of the rows the KL averages over: every real token of a causal LM, every
    row of a classifier."""
    logits = out.logits if hasattr(out, "logits") else out[0]
    if task == "text-generation":
        logits = logits[batch["attention_mask"].bool()]
    return F.log_softmax(logits.float(), dim=-1)


class SkipKL:
    """KL(model || model with a block of layers skipped), mean over the data's rows; each block
    measured once and remembered."""

    def __init__(self, model: TorchModel, spec: ArchSpec, data: DepthData):
        if model.task not in ("text-generation", "sequence-classification"):
            raise BadInput(f"prune: layer_importance='kl' needs a model with an output distribution (a causal LM or "
                           f"a classifier); {model.name} is a {model.task} model: use layer_importance='angular'")
        self.model, self.spec, self.data = model, spec, data
        self.cache: dict[tuple[int, int], float] = {}

    @property
    def count(self) -> int:
        return len(layers_of(self.model.module, self.spec))

    def blocks(self, size: int) -> list[float]:
        """KL of skipping layers [l, l + size) for every start l."""
        starts = [s for s in range(self.count - size + 1) if (s, size) not in self.cache]
        if starts:
            self._measure(starts, size)
        return [self.cache[(s, size)] for s in range(self.count - size + 1)]

    def _measure(self, starts: list[int], size: int) -> None:
        module = self.model.module
        layers = layers_of(module, self.spec)
        was_training = module.training
        module.eval()
        totals = dict.fromkeys(starts, 0.0)
        rows = 0
        try:
            with torch.no_grad():
                for batch in self.data.batches:
                    ref = _output_logprobs(_run(module, batch), batch, self.model.task)
                    rows += len(ref)
                    for start in starts:
                        with _Skip(layers, range(start, start + size)):
                            cand = _output_logprobs(_run(module, batch), batch, self.model.task)
                        totals[start] += float((ref.exp() * (ref - cand)).sum())
        finally:
            module.train(was_training)
        for start, total in totals.items():
            self.cache[(start, size)] = max(total / max(rows, 1), 0.0)


@dataclass
class DepthScores:
    """Per-layer scores (higher = keep) and, for block selection, the score of removing each block
    of a given size (lower = remove first)."""

    layers: list[float]
    blocks: Callable[[int], list[float]] | None
    report: dict[str, Any] = field(default_factory=dict)


def measure_depth(model: TorchModel, spec: ArchSpec, texts: list[str], *, criterion: str, selection: str,
                  max_length: int) -> DepthScores:
    """Layer scores by ``criterion`` (angular, kl) on ``texts``, and block scores for ``selection='block'``."""
    data = measurement_batches(model, texts, max_length)
    module = model.module
    report: dict[str, Any] = {"layer_importance": criterion, "layer_selection": selection,
                              "layer_texts": data.texts, "layer_tokens": data.tokens}
    if criterion == "angular":
        was_training = module.training
        module.eval()
        try:
            distances = angular_distances(module, spec, data)
        finally:
            module.train(was_training)
        count = distances.shape[0] - 1
        layers = [float(distances[i, i + 1]) for i in range(count)]

        def blocks(size: int) -> list[float]:
            return [float(distances[s, s + size]) for s in range(count - size + 1)]
    else:
        kl = SkipKL(model, spec, data)
        layers = kl.blocks(1)
        blocks = kl.blocks
    report["layer_scores"] = [round(v, 6) for v in layers]
    log.info("layer importance (%s, %d tokens): %s", criterion, data.tokens, report["layer_scores"])
    return DepthScores(layers, blocks if selection == "block" else None, report)
