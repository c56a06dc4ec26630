"""Knowledge distillation: train a student to reproduce a teacher, to recover what pruning cost or
to train a shallower copy.

- **Teacher**: ``teacher`` (a model folder), else the run's source model (``ctx.source``), else the
  input itself.
- **Student**: the artifact the chain hands the pass (a pruned model, typically), or, with
  ``keep_layers`` / ``every_k``, a copy of the teacher that keeps only those layers.
- **Losses** (weights in ``losses``): ``cosine`` between mean-pooled last hidden states (sentence
  encoders), ``kl`` between temperature-softened logits (classifiers and causal LMs), ``hidden_mse``
  between mapped hidden states (``layer_map``: student layer → teacher layer), ``task`` (cross
  entropy on the labels, or next-token loss for causal LMs). Where widths differ, a learned linear
  projection maps the student's width to the teacher's (trained with the student, not part of the
  output model).
- **Data**: ``data`` (a file or ``builtin:wordnet``), else the run's texts. The first ``eval_texts``
  rows (at most a fifth) are held out: the pass measures fidelity on them (mean cosine to the
  teacher) to pick the best step, and never trains on them.

The loop (schedule, accumulation, bf16, checkpoints and resume, DDP) is :mod:`edgesmith.training`.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from edgesmith.artifacts import TorchModel
from edgesmith.compress.base import Context, Pass, PassConfig, register
from edgesmith.errors import BadInput
from edgesmith.training import (
    TextBatches,
    TrainSettings,
    padded_batches,
    rank_zero_remove,
    train,
    world,
)

log = logging.getLogger(__name__)

LOSSES = ("cosine", "kl", "hidden_mse", "task")
#: where the list of transformer layers lives, relative to ``module.base_model``
LAYER_PATHS = ("encoder.layer", "transformer.layer", "layers", "h", "decoder.layers", "transformer.h")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class DistillConfig(PassConfig):
    """Teacher, student, losses, data and the training settings of a distillation."""

    teacher: str | None = Field(None, description="model folder; default: the run's source model")
    keep_layers: list[int] | None = Field(None, description="student = the teacher with only these layers (0-based)")
    every_k: int | None = Field(None, description="student = the teacher with every k-th layer (k-1, 2k-1, …)")
    losses: dict[Literal["cosine", "kl", "hidden_mse", "task"], float] | None = Field(
        None, description="loss weights; default: cosine for encoders, kl (+ task with labels) for classifiers")
    temperature: float = Field(2.0, gt=0)
    layer_map: dict[int, int] | None = Field(None, description="hidden_mse: student layer → teacher layer (0-based)")
    project: bool | None = Field(None, description="learn linear projections where widths differ "
                                                   "(default: only for a narrower student)")
    data: str | None = Field(None, description="training texts: a local file or builtin:wordnet; default: the run's data")
    text_field: str = "text"
    label_field: str | None = None
    limit: int | None = Field(None, gt=0, description="use at most this many rows of data")
    offset: int = Field(0, ge=0, description="skip this many rows of `data` first (keep training text apart "
                                             "from the recipe's evaluation rows)")
    eval_texts: int = Field(256, ge=2, description="rows held out for validation (at most a fifth of the data)")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    eval_every: int = Field(50, ge=1)
    patience: int | None = Field(None, ge=1, description="stop after this many evaluations without improvement")
    min_delta: float = Field(1e-4, ge=0, description="smallest validation gain that counts for patience")
    checkpoint_every: int | None = Field(100, ge=1, description="None: no checkpoints")
    checkpoint_dir: str | None = Field(None, description="default: ctx.extras['checkpoint_dir'] or the edgesmith cache")
    keep_checkpoints: bool = False
    max_length: int = Field(128, ge=2)

    @field_validator("losses")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one loss, e.g. {cosine: 1.0}")
            for name, weight in value.items():
                if not weight > 0:
                    raise ValueError(f"loss '{name}' needs a weight above 0 (got {weight})")
        return value

    @model_validator(mode="after")
    def _one_student(self) -> DistillConfig:
        if self.keep_layers is not None and self.every_k is not None:
            raise ValueError("give keep_layers or every_k, not both")
        if self.every_k is not None and self.every_k < 1:
            raise ValueError("every_k must be at least 1 (2 keeps every other layer)")
        if self.keep_layers is not None and (not self.keep_layers or len(set(self.keep_layers)) != len(self.keep_layers)):
            raise ValueError("keep_layers must list distinct layer indices, at least one")
        return self

    def settings(self) -> TrainSettings:
        return TrainSettings(
            steps=self.steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio, schedule=self.schedule, grad_clip=self.grad_clip,
            grad_accum=self.grad_accum, precision=self.precision, seed=self.seed, eval_every=self.eval_every,
            patience=self.patience, min_delta=self.min_delta, checkpoint_every=self.checkpoint_every, max_length=self.max_length)


# ---------------------------------------------------------------------------------------------
# Layers, depth-reduced students
# ---------------------------------------------------------------------------------------------


def find_layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The full module path and the ModuleList of the transformer layers."""
    base = getattr(module, "base_model", module)
    names = {id(m): name for name, m in module.named_modules()}
    for path in LAYER_PATHS:
        obj: Any = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList) and len(obj):
            return names[id(obj)], obj
    raise BadInput(f"distill cannot find the transformer layers of {type(module).__name__}; "
                   f"known layouts: {', '.join(LAYER_PATHS)}")


def num_layers(module: nn.Module) -> int:
    return len(find_layers(module)[1])


def chosen_layers(config: DistillConfig, teacher_layers: int) -> list[int] | None:
    if config.every_k is not None:
        if config.every_k > teacher_layers:
            raise BadInput(f"distill: every_k={config.every_k} but the teacher has only {teacher_layers} layers")
        return list(range(config.every_k - 1, teacher_layers, config.every_k))
    if config.keep_layers is not None:
        bad = [i for i in config.keep_layers if not 0 <= i < teacher_layers]
        if bad:
            raise BadInput(f"distill: keep_layers names layer {bad[0]}, but the teacher has layers 0-{teacher_layers - 1}")
        return sorted(config.keep_layers)
    return None


def _remap_structure(structure: dict[str, dict], prefix: str, keep: list[int]) -> dict[str, dict]:
    """Rename per-layer structure entries to the kept layers' new indices; drop the others."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)(\..*)?$")
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, dict] = {}
    for path, values in structure.items():
        match = pattern.match(path)
        if match is None:
            out[path] = copy.deepcopy(values)
        elif int(match.group(1)) in new_index:
            out[f"{prefix}.{new_index[int(match.group(1))]}{match.group(2) or ''}"] = copy.deepcopy(values)
    return out


def depth_reduced(teacher: TorchModel, keep: list[int]) -> TorchModel:
    """A copy of ``teacher`` that keeps only the layers ``keep`` (config and structure updated)."""
    module = copy.deepcopy(teacher.module)
    prefix, layers = find_layers(module)
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(kept):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new
    parent_path, _, child = prefix.rpartition(".")
    setattr(module.get_submodule(parent_path) if parent_path else module, child, kept)
    config = getattr(module, "config", None)
    if config is not None:
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in keep]
    return teacher.derive(module=module, structure=_remap_structure(teacher.structure, prefix, keep))


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

    def teacher_outputs(self, batch: dict[str, torch.Tensor]) -> Any:
        with torch.no_grad():
            return self.teacher(**self._feeds(batch), output_hidden_states=self._needs_hidden_states())

    def student_outputs(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.student(**self._feeds(batch), output_hidden_states=self._needs_hidden_states())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        t_out, s_out = self.teacher_outputs(batch), self.student_outputs(batch)
        terms: dict[str, torch.Tensor] = {}
        if "cosine" in self.losses:
            s_vec = self._project("pooled", mean_pool(_last_hidden(s_out).float(), mask))
            t_vec = mean_pool(_last_hidden(t_out).float(), mask)
            terms["cosine"] = (1.0 - F.cosine_similarity(s_vec, t_vec, dim=-1)).mean()
        if "kl" in self.losses:
            terms["kl"] = self._kl(s_out.logits.float(), t_out.logits.float(), mask)
        if "hidden_mse" in self.losses:
            terms["hidden_mse"] = self._hidden_mse(s_out.hidden_states, t_out.hidden_states, mask)
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

    def _task(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.task == "text-generation":
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return F.cross_entropy(logits, batch["labels"])


# ---------------------------------------------------------------------------------------------
# Inputs: teacher, student, data, losses
# ---------------------------------------------------------------------------------------------


def resolve_teacher(config: DistillConfig, artifact: TorchModel, ctx: Context) -> TorchModel:
    if config.teacher is not None:
        from edgesmith.artifacts import load

        teacher = load(config.teacher, task=artifact.task)
        if not isinstance(teacher, TorchModel):
            raise BadInput(f"distill: teacher {config.teacher} is a {teacher.kind} model; give a PyTorch model folder")
    elif isinstance(ctx.source, TorchModel):
        teacher = ctx.source
    else:
        teacher = artifact
    if teacher.task != artifact.task:
        raise BadInput(f"distill: the teacher is a {teacher.task} model and the student a {artifact.task} model; "
                       "give a teacher of the same task")
    return teacher


def _same_vocabulary(a, b) -> bool:
    if a is b or a is None or b is None:
        return True
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def resolve_losses(config: DistillConfig, task: str, has_labels: bool) -> dict[str, float]:
    if config.losses is None:
        if task == "feature-extraction":
            return {"cosine": 1.0}
        losses = {"kl": 1.0}
        if task == "sequence-classification" and has_labels:
            losses["task"] = 1.0
        return losses
    losses = dict(config.losses)
    if "kl" in losses and task == "feature-extraction":
        raise BadInput("distill: the kl loss needs logits (a classifier or a causal LM); "
                       "use cosine or hidden_mse for an encoder")
    if "task" in losses:
        if task == "feature-extraction":
            raise BadInput("distill: the task loss needs a classifier or a causal LM; an encoder has no task head")
        if task == "sequence-classification" and not has_labels:
            raise BadInput("distill: the task loss needs labels; give label_field (and data with labels)")
    return losses


def layer_pairs(config: DistillConfig, student_layers: int, teacher_layers: int,
                kept: list[int] | None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for hidden_mse."""
    if config.layer_map is not None:
        pairs = sorted(config.layer_map.items())
        for s, t in pairs:
            if not 0 <= s < student_layers:
                raise BadInput(f"distill: layer_map names student layer {s}, but the student has layers 0-{student_layers - 1}")
            if not 0 <= t < teacher_layers:
                raise BadInput(f"distill: layer_map names teacher layer {t}, but the teacher has layers 0-{teacher_layers - 1}")
        return pairs
    if kept is not None:
        return list(enumerate(kept))
    # spread the student's layers evenly over the teacher's, last onto last
    return [(i, (i + 1) * teacher_layers // student_layers - 1) for i in range(student_layers)]


def training_texts(config: DistillConfig, ctx: Context) -> tuple[list[str], list[Any] | None]:
    from edgesmith.data import pass_texts

    return pass_texts(ctx.texts, ctx.labels, data=config.data, text_field=config.text_field,
                      label_field=config.label_field, limit=config.limit, offset=config.offset, needed_by="distill")


def split_holdout(texts: list[str], labels: list[Any] | None, eval_texts: int
                  ) -> tuple[list[str], list[Any] | None, list[str]]:
    """Hold out the first rows (at most a fifth); drop training rows equal to a held-out text."""
    n_eval = min(eval_texts, len(texts) // 5)
    if n_eval < 2 or len(texts) - n_eval < 2:
        raise BadInput(f"distill needs at least 10 texts (got {len(texts)}): a fifth is held out for validation")
    held = texts[:n_eval]
    held_set = set(held)
    keep = [i for i in range(n_eval, len(texts)) if texts[i] not in held_set]
    return [texts[i] for i in keep], ([labels[i] for i in keep] if labels else None), held


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


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def _checkpoint_root(config: DistillConfig, ctx: Context):
    from pathlib import Path

    if config.checkpoint_dir is not None:
        return Path(config.checkpoint_dir).expanduser()
    if ctx.extras.get("checkpoint_dir"):
        return Path(ctx.extras["checkpoint_dir"])
    from edgesmith.cache import default_cache_dir

    return default_cache_dir() / "checkpoints"


def _fingerprint(config: DistillConfig, student: TorchModel, teacher: TorchModel, texts: list[str],
                 labels: list[Any] | None, held: list[str]) -> str:
    from edgesmith.storage import sha256_json

    semantic = config.model_dump(mode="json", exclude={"checkpoint_every", "checkpoint_dir", "keep_checkpoints"})
    return sha256_json({"pass": "distill", "config": semantic, "student": student.content_hash(),
                        "teacher": teacher.content_hash(), "texts": sha256_json([texts, labels, held]),
                        "world_size": world()[1]})


@register
class DistillPass(Pass):
    """Train a student (the input, or a shallower copy of the teacher) to reproduce the teacher."""

    name = "distill"
    config_class = DistillConfig
    accepts = (TorchModel,)
    returns = TorchModel
    description = "knowledge distillation from the source model (or a teacher folder) into the input"
    uses = frozenset({"data", "source"})
    config: DistillConfig

    def apply(self, artifact: TorchModel, ctx: Context) -> TorchModel:
        config = self.config
        teacher = resolve_teacher(config, artifact, ctx)
        if not _same_vocabulary(teacher.tokenizer, artifact.tokenizer):
            raise BadInput("distill: the teacher's and the student's tokenizers differ; "
                           "distillation here needs one vocabulary")
        tokenizer = artifact.tokenizer or teacher.tokenizer
        if tokenizer is None:
            raise BadInput(f"distill: model '{artifact.name}' has no tokenizer; save one beside the model")
        teacher_layers = num_layers(teacher.module)
        kept = chosen_layers(config, teacher_layers)
        if kept is None and teacher.module is artifact.module:
            raise BadInput("distill: the teacher is the student itself; give teacher=<model folder> (or run after "
                           "prune in a recipe, whose source model is the teacher), or every_k / keep_layers")
        student = depth_reduced(teacher, kept) if kept is not None else artifact.derive(
            module=copy.deepcopy(artifact.module), structure=copy.deepcopy(artifact.structure))
        student_layers = num_layers(student.module)

        texts, labels = training_texts(config, ctx)
        train_texts, train_labels, held = split_holdout(texts, labels, config.eval_texts)
        losses = resolve_losses(config, artifact.task, train_labels is not None)
        if "task" in losses and artifact.task == "sequence-classification":
            from edgesmith.quality import label_ids

            train_labels = label_ids(student, train_labels, int(student.config.num_labels)).tolist()
        pairs = layer_pairs(config, student_layers, teacher_layers, kept) if "hidden_mse" in losses else []

        settings = config.settings()
        device = _device()
        teacher_module = teacher.module
        if teacher_module.training or device.type != "cpu":
            teacher_module = copy.deepcopy(teacher_module).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the projections' initial weights
            objective = DistillObjective(student.module, teacher_module.to(device), task=artifact.task,
                                         losses=losses, temperature=config.temperature, layer_pairs=pairs,
                                         project=config.project, input_names=student.input_names)
        objective.to(device)
        data = TextBatches(tokenizer, train_texts, batch_size=config.batch_size, max_length=config.max_length,
                           seed=config.seed, input_names=objective.input_names,
                           labels=train_labels if "task" in losses and artifact.task == "sequence-classification" else None)
        validation = Validation(objective, tokenizer, held, max_length=config.max_length, device=device)
        objective.eval()
        before = validation.fidelity()

        checkpoint_dir = None
        key = ""
        if config.checkpoint_every is not None:
            key = _fingerprint(config, artifact if kept is None else student, teacher, train_texts, train_labels, held)
            checkpoint_dir = _checkpoint_root(config, ctx) / f"distill-{key[:20]}"
        log.info("distilling %s (%d layers) from %s (%d layers): %s, %d training texts, %d held out",
                 artifact.name, student_layers, teacher.name, teacher_layers, losses, len(train_texts), len(held))
        result = train(objective, data, settings, evaluate=validation, checkpoint_dir=checkpoint_dir, key=key,
                       progress=ctx.progress, device=device, on_step=ctx.extras.get("on_step"), label="distill")
        after = validation.fidelity()
        if checkpoint_dir is not None and not config.keep_checkpoints:
            rank_zero_remove(checkpoint_dir)

        module = objective.student.to("cpu").eval()
        ctx.report.update({
            "teacher": teacher.name,
            "student_layers": student_layers,
            "teacher_layers": teacher_layers,
            "kept_layers": kept,
            "losses": losses,
            "train_texts": len(train_texts),
            "eval_texts": len(held),
            "fidelity_before": before,
            "fidelity_after": after,
            **{f"{name}_before": value for name, value in before.items()},
            **{f"{name}_after": value for name, value in after.items()},
            "steps_run": result.steps_run,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "resumed_from_step": result.resumed_from,
            "train_seconds": round(result.seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2),
            "precision": result.precision,
            "world_size": result.world_size,
            "history": result.history,
            "params": sum(p.numel() for p in module.parameters()),
            "projections": sorted(objective.projections.keys()),
        })
        log.info("distilled: fidelity %.4f → %.4f (best step %d of %d, %.1f s)", before["cosine"], after["cosine"],
                 result.best_step, result.steps_run, result.seconds)
        return student.derive(module=module, structure=copy.deepcopy(student.structure))


def _device() -> torch.device:
    from edgesmith.training import default_device

    return default_device()
