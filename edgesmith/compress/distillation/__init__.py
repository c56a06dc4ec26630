"""Knowledge distillation: train a student to reproduce a teacher, to recover what pruning cost or
to train a shallower copy.

- **Teacher**: ``teacher`` (a model folder), else the run's source model (``ctx.source``), else the
  input itself.
- **Student**: the artifact the chain hands the pass (a pruned model, typically), or, with
  ``keep_layers`` / ``every_k``, a copy of the teacher that keeps only those layers.
- **Losses** (weights in ``losses``): ``cosine`` between mean-pooled last hidden states (sentence
  encoders), ``kl`` between temperature-softened logits (classifiers and causal LMs), ``hidden_mse``
  between mapped hidden states (``layer_map``: student layer → teacher layer), ``attention`` (KL
  between the teacher's and the student's attention probabilities of the same mapped layers; both
  run with eager attention while training, the output keeps the student's own), ``task`` (cross
  entropy on the labels, or next-token loss for causal LMs). Where widths differ, a learned linear
  projection maps the student's width to the teacher's (trained with the student, not part of the
  output model).
- **Data**: ``data`` (a file or ``builtin:wordnet``), else the run's texts. The first ``eval_texts``
  rows (at most a fifth) are held out: the pass measures fidelity on them (mean cosine to the
  teacher) to pick the best step, and never trains on them.

The loop (schedule, accumulation, bf16, checkpoints and resume, DDP) is :mod:`edgesmith.training`.

The package: :mod:`~edgesmith.compress.distillation.config` (the options),
:mod:`~edgesmith.compress.distillation.layers` (where the layers are, depth-reduced students),
:mod:`~edgesmith.compress.distillation.objective` (losses and validation),
:mod:`~edgesmith.compress.distillation.inputs` (teacher, losses, data and hold-out).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from edgesmith.artifacts import TorchModel
from edgesmith.compress.distillation.config import LOSSES, DistillConfig
from edgesmith.compress.distillation.inputs import (
    _same_vocabulary,
    layer_pairs,
    resolve_losses,
    resolve_teacher,
    split_holdout,
    training_texts,
)
from edgesmith.compress.distillation.layers import chosen_layers, depth_reduced, find_layers, num_layers
from edgesmith.compress.distillation.objective import DistillObjective, Validation, mean_pool
from edgesmith.errors import BadInput
from edgesmith.passes import Context, Pass, register
from edgesmith.training import TextBatches, rank_zero_remove, train, world

log = logging.getLogger(__name__)

__all__ = ["LOSSES", "DistillConfig", "DistillObjective", "DistillPass", "Validation", "chosen_layers",
           "depth_reduced", "find_layers", "layer_pairs", "mean_pool", "num_layers", "resolve_losses",
           "resolve_teacher", "split_holdout", "training_texts"]


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
        student, kept, tokenizer = _student(config, artifact, teacher)
        teacher_layers, student_layers = num_layers(teacher.module), num_layers(student.module)

        texts, labels = training_texts(config, ctx)
        train_texts, train_labels, held = split_holdout(texts, labels, config.eval_texts)
        losses = resolve_losses(config, artifact.task, train_labels is not None)
        classify = "task" in losses and artifact.task == "sequence-classification"
        if classify:
            from edgesmith.quality import label_ids

            train_labels = label_ids(student, train_labels, int(student.config.num_labels)).tolist()
        pairs = (layer_pairs(config, student_layers, teacher_layers, kept)
                 if {"hidden_mse", "attention"} & set(losses) else [])

        device = _device()
        attention_impl = _attention_implementation(student.module)
        teacher_module, dropped = _attention_for_training(teacher.module, student.module, losses, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the projections' initial weights
            objective = DistillObjective(student.module, teacher_module.to(device), task=artifact.task,
                                         losses=losses, temperature=config.temperature, layer_pairs=pairs,
                                         project=config.project, input_names=student.input_names)
        objective.to(device)
        data = TextBatches(tokenizer, train_texts, batch_size=config.batch_size, max_length=config.max_length,
                           seed=config.seed, input_names=objective.input_names,
                           labels=train_labels if classify else None)
        validation = Validation(objective, tokenizer, held, max_length=config.max_length, device=device)
        objective.eval()
        before = validation.fidelity()

        checkpoint_dir, key = None, ""
        if config.checkpoint_every is not None:
            key = _fingerprint(config, artifact if kept is None else student, teacher, train_texts, train_labels, held)
            checkpoint_dir = _checkpoint_root(config, ctx) / f"distill-{key[:20]}"
        log.info("distilling %s (%d layers) from %s (%d layers): %s, %d training texts, %d held out",
                 artifact.name, student_layers, teacher.name, teacher_layers, losses, len(train_texts), len(held))
        result = train(objective, data, config.settings(), evaluate=validation, checkpoint_dir=checkpoint_dir,
                       key=key, progress=ctx.progress, device=device, on_step=ctx.extras.get("on_step"),
                       label="distill")
        after = validation.fidelity()
        if checkpoint_dir is not None and not config.keep_checkpoints:
            rank_zero_remove(checkpoint_dir)

        module = objective.student.to("cpu").eval()
        if "attention" in losses and attention_impl not in (None, "eager"):
            _set_attention(module, attention_impl)
        for name, p in dropped.items():
            module.get_submodule(name).p = p
        ctx.report.update({
            "teacher": teacher.name, "student_layers": student_layers, "teacher_layers": teacher_layers,
            "kept_layers": kept, "losses": losses, "train_texts": len(train_texts), "eval_texts": len(held),
            **_fidelity_report(before, after), **_training_report(result),
            "params": sum(p.numel() for p in module.parameters()),
            "projections": sorted(objective.projections.keys()),
        })
        log.info("distilled: fidelity %.4f → %.4f (best step %d of %d, %.1f s)", before["cosine"], after["cosine"],
                 result.best_step, result.steps_run, result.seconds)
        return student.derive(module=module, structure=copy.deepcopy(student.structure))


def _student(config: DistillConfig, artifact: TorchModel, teacher: TorchModel):
    """(the student to train, the teacher layers it keeps or None, the tokenizer): the input itself, or a
    shallower copy of the teacher with ``keep_layers`` / ``every_k``."""
    if not _same_vocabulary(teacher.tokenizer, artifact.tokenizer):
        raise BadInput("distill: the teacher's and the student's tokenizers differ; "
                       "distillation here needs one vocabulary")
    tokenizer = artifact.tokenizer or teacher.tokenizer
    if tokenizer is None:
        raise BadInput(f"distill: model '{artifact.name}' has no tokenizer; save one beside the model")
    kept = chosen_layers(config, num_layers(teacher.module))
    if kept is None and teacher.module is artifact.module:
        raise BadInput("distill: the teacher is the student itself; give teacher=<model folder> (or run after "
                       "prune in a recipe, whose source model is the teacher), or every_k / keep_layers")
    student = depth_reduced(teacher, kept) if kept is not None else artifact.derive(
        module=copy.deepcopy(artifact.module), structure=copy.deepcopy(artifact.structure))
    return student, kept, tokenizer


def _attention_for_training(teacher_module, student_module, losses: dict, device: torch.device):
    """The teacher module to train against (a copy where it would otherwise change: eager attention,
    eval mode, another device) and, for the attention loss, both switched to eager attention and the
    student's attention dropout off; returns (teacher module, {dropout path: old p})."""
    if "attention" in losses and (_attention_implementation(teacher_module) not in (None, "eager")):
        teacher_module = copy.deepcopy(teacher_module)  # the source model is left as it was
    if teacher_module.training or device.type != "cpu":
        teacher_module = copy.deepcopy(teacher_module).eval()
    dropped: dict[str, float] = {}
    if "attention" in losses:
        for module in (student_module, teacher_module):
            _set_attention(module, "eager")
        dropped = _no_attention_dropout(student_module)
    return teacher_module, dropped


def _fidelity_report(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    return {"fidelity_before": before, "fidelity_after": after,
            **{f"{name}_before": value for name, value in before.items()},
            **{f"{name}_after": value for name, value in after.items()}}


def _training_report(result) -> dict[str, Any]:
    return {"steps_run": result.steps_run, "best_step": result.best_step, "stopped_early": result.stopped_early,
            "resumed_from_step": result.resumed_from, "train_seconds": round(result.seconds, 2),
            "samples_per_second": round(result.samples_per_second, 2), "precision": result.precision,
            "world_size": result.world_size, "history": result.history, "timeline": result.timeline}


def _attention_implementation(module) -> str | None:
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def _set_attention(module, implementation: str) -> None:
    """Switch a Hugging Face model's attention implementation (eager returns attention maps)."""
    setter = getattr(module, "set_attn_implementation", None)
    if setter is None:
        raise BadInput(f"distill: the attention loss needs a Hugging Face model that can switch to eager attention; "
                       f"{type(module).__name__} cannot: drop the attention loss")
    try:
        setter(implementation)
    except (ValueError, ImportError) as exc:
        raise BadInput(f"distill: cannot switch {type(module).__name__} to {implementation} attention "
                       f"({str(exc).splitlines()[0][:200]}); drop the attention loss") from exc


def _no_attention_dropout(module) -> dict[str, float]:
    """Dropout on the attention probabilities off (the maps the attention loss compares are taken after
    it: dropped entries would be zeros the teacher's map has not); returns {module path: old p}."""
    old = {}
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Dropout) and sub.p > 0 and (
                name.endswith(("attention.self.dropout", "attn_dropout", "attention_dropout"))):
            old[name], sub.p = sub.p, 0.0
    return old


def _device() -> torch.device:
    from edgesmith.training import default_device

    return default_device()
