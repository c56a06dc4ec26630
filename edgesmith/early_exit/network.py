"""A BERT-family model with exit heads, cut into segments.

``ExitNetwork`` wraps a Hugging Face ``BertModel`` (encoder) or ``BertForSequenceClassification``
(classifier) and adds one head per early exit. ``exit_layers`` counts the layers executed at each
exit, ascending; the last is always the model's depth, whose "head" is the model's own output
(the classifier's pooler + classification layer, or the encoder's ``last_hidden_state``).

- Classifier exits: masked mean of the layer's token vectors, dense + tanh, classification layer
  (initialised from the model's pooler and classifier, then trained).
- Encoder exits: a per-token linear projection (initialised to the identity), so that the exit's
  ``last_hidden_state`` mean-pools to a projected sentence embedding (projection and masked mean
  commute), and every tool that reads ``last_hidden_state`` reads an exit's output unchanged.

Segment ``i`` runs the layers between exit ``i-1`` and exit ``i`` and then exit ``i``'s head; the
first segment starts with the embeddings. Layers are called one by one with an additive attention
mask, which reproduces the model's own ``hidden_states`` exactly (checked in the tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from edgesmith.errors import BadInput
from edgesmith.pooling import mean_pool

log = logging.getLogger(__name__)

SEGMENT_HIDDEN_IN = "hidden_in"
SEGMENT_HIDDEN_OUT = "hidden_out"


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-mean of token vectors (:func:`edgesmith.pooling.mean_pool`)."""
    return mean_pool(hidden, mask)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) 0/1 mask -> (batch, 1, 1, seq) additive mask as eager BERT attention expects."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class ClassifierExit(nn.Module):
    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(masked_mean(hidden, mask))))


class ProjectionExit(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(hidden))
            self.proj.bias.zero_()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def base_of(module: nn.Module, task: str) -> nn.Module:
    """The BERT-like backbone (``embeddings`` + ``encoder.layer``); BadInput for other layouts."""
    base = getattr(module, "base_model", module)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not hasattr(base, "embeddings") or not isinstance(layers, nn.ModuleList) or not len(layers):
        raise BadInput(f"early-exit supports BERT-family models (embeddings + encoder.layer); "
                       f"{type(module).__name__} has another layout")
    if getattr(base.config, "is_decoder", False):
        raise BadInput("early-exit supports encoders and classifiers, not decoders")
    if task == "sequence-classification":
        if getattr(base, "pooler", None) is None or not isinstance(getattr(module, "classifier", None), nn.Linear):
            raise BadInput(f"early-exit classifiers need a BertForSequenceClassification-like model (pooler + linear "
                           f"classifier); {type(module).__name__} is not one")
    elif task != "feature-extraction":
        raise BadInput(f"early-exit works on feature-extraction and sequence-classification models, not {task}")
    return base


def default_exit_layers(depth: int) -> list[int]:
    """Every layer from the second on (the last one is the model's own output)."""
    return list(range(min(2, depth), depth + 1))


def check_exit_layers(exits: Sequence[int] | None, depth: int) -> list[int]:
    if exits is None:
        return default_exit_layers(depth)
    chosen = sorted({int(e) for e in exits})
    bad = [e for e in chosen if not 1 <= e <= depth]
    if bad:
        raise BadInput(f"exit after layer {bad[0]}: the model has layers 1-{depth}")
    if not chosen or chosen[-1] != depth:
        chosen.append(depth)
    return chosen


class ExitNetwork(nn.Module):
    """The model plus exit heads; ``forward`` returns every exit's output."""

    def __init__(self, module: nn.Module, task: str, exit_layers: Sequence[int], heads: nn.ModuleList | None = None):
        super().__init__()
        self.task = task
        self.model = module
        base = base_of(module, task)
        self.depth = len(base.encoder.layer)
        self.exit_layers = check_exit_layers(exit_layers, self.depth)
        self.hidden = int(base.config.hidden_size)
        self.classes = int(module.config.num_labels) if task == "sequence-classification" else None
        self.heads = heads if heads is not None else self._new_heads()
        if len(self.heads) != len(self.exit_layers) - 1:
            raise BadInput(f"{len(self.heads)} exit heads for {len(self.exit_layers) - 1} early exits")

    @property
    def base(self) -> nn.Module:
        return getattr(self.model, "base_model", self.model)

    def _new_heads(self) -> nn.ModuleList:
        heads = []
        for _ in self.exit_layers[:-1]:
            if self.task == "sequence-classification":
                head = ClassifierExit(self.hidden, self.classes)
                with torch.no_grad():  # start from the model's own head, read from a mean-pooled layer
                    head.dense.load_state_dict(self.base.pooler.dense.state_dict())
                    head.out.load_state_dict(self.model.classifier.state_dict())
            else:
                head = ProjectionExit(self.hidden)
            heads.append(head)
        return nn.ModuleList(heads)

    # -- pieces -----------------------------------------------------------------------------
    def segments(self) -> list[tuple[int, int]]:
        starts = [0] + self.exit_layers[:-1]
        return list(zip(starts, self.exit_layers))

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def layers(self, hidden: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        ext = additive_mask(mask, hidden.dtype)
        for layer in self.base.encoder.layer[start:end]:
            hidden = layer(hidden, ext)
        return hidden

    def exit_output(self, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if index < len(self.heads):
            return self.heads[index](hidden, mask)
        if self.task == "sequence-classification":
            pooled = self.base.pooler(hidden)
            return self.model.classifier(pooled)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, *, with_hidden: bool = False):
        """Every exit's output (and, with ``with_hidden``, the hidden state at each exit)."""
        hidden = self.embed(input_ids, token_type_ids)
        outputs, states = [], []
        for i, (start, end) in enumerate(self.segments()):
            hidden = self.layers(hidden, attention_mask, start, end)
            states.append(hidden)
            outputs.append(self.exit_output(i, hidden, attention_mask))
        return (outputs, states) if with_hidden else outputs


class Segment(nn.Module):
    """One exportable segment: (input_ids, attention_mask[, token_type_ids]) for the first,
    (hidden_in, attention_mask) for the others -> (hidden_out, exit output); the last segment
    returns only its output."""

    def __init__(self, net: ExitNetwork, index: int, input_names: Sequence[str]):
        super().__init__()
        self.net = net
        self.index = index
        self.start, self.end = net.segments()[index]
        self.first = index == 0
        self.last = index == len(net.exit_layers) - 1
        self.names = list(input_names)

    def forward(self, *args: torch.Tensor):
        feeds = dict(zip(self.names, args))
        mask = feeds["attention_mask"]
        if self.first:
            hidden = self.net.embed(feeds["input_ids"], feeds.get("token_type_ids"))
        else:
            hidden = feeds[SEGMENT_HIDDEN_IN]
        hidden = self.net.layers(hidden, mask, self.start, self.end)
        out = self.net.exit_output(self.index, hidden, mask)
        return out if self.last else (hidden, out)


def segment_io(net: ExitNetwork, index: int, model_inputs: Sequence[str], output: str) -> tuple[list[str], list[str]]:
    """Input and output names of segment ``index``."""
    inputs = list(model_inputs) if index == 0 else [SEGMENT_HIDDEN_IN, "attention_mask"]
    outputs = [output] if index == len(net.exit_layers) - 1 else [SEGMENT_HIDDEN_OUT, output]
    return inputs, outputs
