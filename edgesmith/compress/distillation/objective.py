"""The distillation objective (weighted losses against the teacher) and the validation on held-out texts.

:class:`DistillObjective` holds the student and the width projections; :class:`Validation` is the
fidelity of the student on held-out texts, which the training loop reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgesmith.compress.distillation.layers import num_layers
from edgesmith.errors import BadInput
from edgesmith.training import padded_batches

# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def hidden_width(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    for name in ("hidden_size", "dim", "n_embd", "d_model"):
        if config is not None and getattr(config, name, None):
            return int(getattr(config, name))
    raise BadInput(f"distill cannot tell the hidden width of {type(module).__name__} (no hidden_size in its config)")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def _last_hidden(out: Any) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out.hidden_states[-1]


class DistillObjective(nn.Module):
    """Student + projections; ``forward(batch)`` returns the weighted loss and its terms.

    The teacher is held outside the module tree, so it is neither trained, nor saved in
    checkpoints, nor wrapped by DistributedDataParallel.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, task: str, losses: dict[str, float],
                 temperature: float, layer_pairs: list[tuple[int, int]], project: bool | None,
                 input_names: list[str]):
        super().__init__()
        self.student = student
        self._teacher = [teacher]
        self.task = task
        self.losses = dict(losses)
        self.temperature = temperature
        self.layer_pairs = layer_pairs
        self.input_names = input_names
        self.projections = nn.ModuleDict()
        self._make_projections(hidden_width(student), hidden_width(teacher), project)

    def _make_projections(self, s_width: int, t_width: int, project: bool | None) -> None:
        """Linear maps from the student's width to the teacher's, where a loss compares hidden states."""
        compares_hidden = "cosine" in self.losses or "hidden_mse" in self.losses
        if s_width == t_width or not compares_hidden:
            if s_width != t_width and self.task == "feature-extraction":
                raise BadInput(f"distill: the student's width {s_width} differs from the teacher's {t_width} and "
                               "no loss compares hidden states; add the cosine or hidden_mse loss")
            return
        if project is False:
            raise BadInput(f"distill: the student's width {s_width} differs from the teacher's {t_width}; "
                           "set project: true to learn a linear projection between them")
        if s_width > t_width and project is None:
            raise BadInput(f"distill: the student (width {s_width}) is wider than the teacher ({t_width}) "
                           "and no mapping is given; set project: true to learn a linear map from the "
                           "student's width to the teacher's, or pick a narrower student")
        if "cosine" in self.losses:
            self.projections["pooled"] = nn.Linear(s_width, t_width)
        for s_layer, _ in self.layer_pairs:
            self.projections[f"hidden{s_layer}"] = nn.Linear(s_width, t_width)
        if self.task == "feature-extraction" and "pooled" not in self.projections:
            last = num_layers(self.student) - 1
            if f"hidden{last}" not in self.projections:
                raise BadInput(f"distill: the student's width {s_width} differs from the teacher's {t_width}: "
                               f"map its last layer ({last}) in layer_map, or add the cosine loss")

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _feeds(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in self.input_names}

    def _needs_hidden_states(self) -> bool:
        return "hidden_mse" in self.losses or self.task != "feature-extraction"

    def _needs_attentions(self) -> bool:
        return "attention" in self.losses

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.projections[name](x) if name in self.projections else x

    def representation(self, out: Any, mask: torch.Tensor, *, student: bool) -> torch.Tensor:
        """What fidelity compares: classifier logits, mean-pooled LM logits, or the mean-pooled last
        hidden state of an encoder (through the student's projection where widths differ; a linear
        map commutes with the mean)."""
        if self.task == "sequence-classification":
            return out.logits.float()
        if self.task == "text-generation":
            return mean_pool(out.logits.float(), mask)
        pooled = mean_pool(_last_hidden(out).float(), mask)
        if not student:
            return pooled
        if "pooled" in self.projections:
            return self.projections["pooled"](pooled)
        return self._project(f"hidden{num_layers(self.student) - 1}", pooled)

    def _extras(self, training: bool) -> dict[str, bool]:
        extras = {"output_hidden_states": self._needs_hidden_states()}
        if training and self._needs_attentions():
            extras["output_attentions"] = True
        return extras

    def teacher_outputs(self, batch: dict[str, torch.Tensor], *, training: bool = False) -> Any:
        with torch.no_grad():
            return self.teacher(**self._feeds(batch), **self._extras(training))

    def student_outputs(self, batch: dict[str, torch.Tensor], *, training: bool = False) -> Any:
        return self.student(**self._feeds(batch), **self._extras(training))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        t_out, s_out = self.teacher_outputs(batch, training=True), self.student_outputs(batch, training=True)
        terms: dict[str, torch.Tensor] = {}
        if "cosine" in self.losses:
            s_vec = self._project("pooled", mean_pool(_last_hidden(s_out).float(), mask))
            t_vec = mean_pool(_last_hidden(t_out).float(), mask)
            terms["cosine"] = (1.0 - F.cosine_similarity(s_vec, t_vec, dim=-1)).mean()
        if "kl" in self.losses:
            terms["kl"] = self._kl(s_out.logits.float(), t_out.logits.float(), mask)
        if "hidden_mse" in self.losses:
            terms["hidden_mse"] = self._hidden_mse(s_out.hidden_states, t_out.hidden_states, mask)
        if "attention" in self.losses:
            terms["attention"] = self._attention_kl(s_out.attentions, t_out.attentions, mask)
        if "task" in self.losses:
            terms["task"] = self._task(s_out.logits.float(), batch)
        loss = sum(self.losses[name] * value for name, value in terms.items())
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def _kl(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p = F.log_softmax(student / t, dim=-1)
        q = F.softmax(teacher / t, dim=-1)
        per_row = (q * (q.clamp_min(1e-12).log() - log_p)).sum(-1)
        if per_row.dim() == 2:  # token-level (causal LM): average over real tokens
            weights = mask.to(per_row.dtype)
            return (per_row * weights).sum() / weights.sum().clamp_min(1) * t * t
        return per_row.mean() * t * t

    def _hidden_mse(self, s_states, t_states, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).float()
        total = 0.0
        for s_layer, t_layer in self.layer_pairs:
            # hidden_states[0] is the embeddings' output; layer i's output is hidden_states[i + 1]
            s = self._project(f"hidden{s_layer}", s_states[s_layer + 1].float())
            t = t_states[t_layer + 1].float()
            total = total + (((s - t) ** 2) * weights).sum() / (weights.sum() * t.shape[-1]).clamp_min(1)
        return total / len(self.layer_pairs)

    def _attention_kl(self, s_maps, t_maps, mask: torch.Tensor) -> torch.Tensor:
        """KL(teacher ‖ student) between the attention probabilities of the mapped layers, per query row
        over the keys, averaged over the real (unpadded) query positions. Heads are compared one to one
        when the two layers have as many heads, else as their mean (a head-pruned student keeps a
        subset of the teacher's heads, in its own order)."""
        if s_maps is None or t_maps is None or any(m is None for m in (*s_maps, *t_maps)):
            raise BadInput("distill: the attention loss needs the models' attention maps, and this model returns "
                           "none (its attention implementation cannot output them); drop the attention loss")
        rows = mask.to(torch.float32)  # (batch, query)
        total = 0.0
        for s_layer, t_layer in self.layer_pairs:
            s, t = s_maps[s_layer].float(), t_maps[t_layer].float()  # (batch, heads, query, key)
            if s.shape[1] != t.shape[1]:
                s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
            kl = (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1).mean(1)  # (batch, query)
            total = total + (kl * rows).sum() / rows.sum().clamp_min(1)
        return total / len(self.layer_pairs)

    def _task(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task == "text-generation":
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return F.cross_entropy(logits, batch["labels"])

# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class Validation:
    """Fidelity of the student on held-out texts: mean cosine of its representation to the teacher's."""

    def __init__(self, objective: DistillObjective, tokenizer, texts: list[str], *, max_length: int,
                 device: torch.device):
        self.objective = objective
        self.device = device
        self.batches = [(rows, {k: v.to(device) for k, v in batch.items()})
                        for rows, batch in padded_batches(tokenizer, texts, batch_size=64, max_length=max_length,
                                                          input_names=objective.input_names)]
        self.n = len(texts)
        self.reference = self._collect(student=False)

    def _collect(self, *, student: bool) -> torch.Tensor:
        rows_out: torch.Tensor | None = None
        with torch.no_grad():
            for rows, batch in self.batches:
                if student:
                    out = self.objective.student_outputs(batch)
                else:
                    out = self.objective.teacher_outputs(batch)
                rep = self.objective.representation(out, batch["attention_mask"], student=student).float().cpu()
                if rows_out is None:
                    rows_out = torch.empty((self.n, rep.shape[-1]))
                rows_out[rows] = rep
        assert rows_out is not None
        return rows_out

    def __call__(self, objective: nn.Module) -> float:
        return float(F.cosine_similarity(self._collect(student=True), self.reference, dim=-1).mean())

    def fidelity(self) -> dict[str, float]:
        """Cosine (mean, worst) and, for embeddings, neighbour recall@10 of the student now."""
        from edgesmith.quality import fidelity, row_cosines

        with torch.no_grad():
            cand = self._collect(student=True).numpy().astype(np.float64)
        ref = self.reference.numpy().astype(np.float64)
        if self.objective.task == "sequence-classification" or self.n <= 10:
            cos = row_cosines(ref, cand)
            return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}
        return fidelity(ref, cand, k=10)
