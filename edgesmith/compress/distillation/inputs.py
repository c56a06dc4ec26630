"""What a distillation starts from (teacher, losses, hidden-state layer pairs, training texts and hold-out)."""

from __future__ import annotations

from typing import Any

from edgesmith.artifacts import TorchModel
from edgesmith.compress.distillation.config import DistillConfig
from edgesmith.errors import BadInput
from edgesmith.passes import Context

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
